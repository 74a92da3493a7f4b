//! Every `ModuleService` RPC of the SDK, called with a tonic client against
//! a real `echo-module` registered with a real `nlb`: the answers carry what
//! the module really did (greetings on new data connections, rate limits on
//! echoed lines, routes at the NLB), and errors name what was wrong. Last,
//! the PROXY v2 data path.
//!
//! These modules run without tokens (changes are open); `module_tokens.rs`
//! covers who may call what.

use std::collections::HashMap;
use std::net::SocketAddr;

use e2e::module::{sha256_hex, start_echo, ModuleLaunch, ModuleProcess};
use e2e::{metric_value, Launch, NlbProcess, Sandbox, CALL_DEADLINE};
use shared_types::pb::module_service_client::ModuleServiceClient;
use shared_types::pb::{
    self, CanHandleRequest, ConfigUpdate, DeleteRouteRequest, Filter, GetActiveVersionRequest,
    GetConfigRequest, GetInstancesRequest, GetMetricsRequest, GetModuleInfoRequest,
    GetModuleInfoResponse, GetRateLimitsRequest, GetRoutesRequest, GetStatsRequest,
    GetStatusRequest, HealthCheckRequest, HealthStatus, ListModulesRequest, ModuleType, Pagination,
    PromoteVersionRequest, Protocol, Query, RateLimit, ReloadRequest, RemoveRateLimitRequest,
    RollbackRequest, ScaleRequest, ScalingConfig, SetRateLimitRequest, SetTrafficWeightRequest,
    ShutdownRequest, StreamMetricsRequest, UpdateConfigRequest, UpdateRoutesRequest,
};
use shared_types::proxy_v2::{self, Header};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tonic::transport::Channel;
use tonic::Code;

/// The version `echo-module` registers (its crate version).
const ECHO_VERSION: &str = "0.1.0";
const DEFAULT_GREETING: &str = "hello from echo";
/// An NLB address where nothing listens (port 1 refuses connections).
const NOWHERE: &str = "127.0.0.1:1";

/// An NLB and one echo module started as `launch` says, registered. (The
/// harness picks every port, and picks again if another process took one
/// first.)
async fn stack_with(sb: &Sandbox, launch: ModuleLaunch) -> (NlbProcess, ModuleProcess) {
    let nlb = sb
        .start_with(Launch {
            use_config_file: false,
            ..Launch::default()
        })
        .await;
    let m = start_echo(sb.path(), &nlb.grpc_addr, &launch).await;
    m.wait_registered().await;
    (nlb, m)
}

/// An NLB and one registered echo module with the default config.
async fn stack(sb: &Sandbox, id: &str) -> (NlbProcess, ModuleProcess) {
    stack_with(sb, launch(id, None)).await
}

fn launch(id: &str, config: Option<&str>) -> ModuleLaunch {
    ModuleLaunch {
        instance_id: Some(id.into()),
        config: config.map(str::to_string),
        ..ModuleLaunch::default()
    }
}

async fn info(nlb: &NlbProcess, id: &str) -> Option<GetModuleInfoResponse> {
    nlb.client()
        .await
        .get_module_info(GetModuleInfoRequest {
            instance_id: id.into(),
        })
        .await
        .ok()
        .map(|r| r.into_inner())
}

fn route(id: &str, protocol: Protocol, port: i32, priority: i32) -> pb::Route {
    pb::Route {
        route_id: id.into(),
        protocol: protocol as i32,
        destination_port: port,
        priority,
        ..pb::Route::default()
    }
}

fn ids(routes: &[pb::Route]) -> Vec<String> {
    routes.iter().map(|r| r.route_id.clone()).collect()
}

/// The route ids the NLB has for instance `id`, sorted.
async fn nlb_route_ids(nlb: &NlbProcess, id: &str) -> Option<Vec<String>> {
    let mut got = ids(&info(nlb, id).await?.routes);
    got.sort();
    Some(got)
}

/// The greeting text of a greeting line `"<greeting> (<client>)"`.
fn greeting_text(line: &str) -> &str {
    line.rsplit_once(" (")
        .map(|(g, _)| g)
        .unwrap_or_else(|| panic!("not a greeting line: {line:?}"))
}

/// A new data connection's greeting text.
async fn greeting(m: &ModuleProcess) -> String {
    greeting_text(&m.connect().await.greeting).to_string()
}

fn expect_err<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> tonic::Status {
    match r {
        Ok(resp) => panic!("expected an error, got {:?}", resp.into_inner()),
        Err(s) => s,
    }
}

/// Asserts `r` failed with `code` and a message containing each of `words`.
fn assert_status<T: std::fmt::Debug>(
    r: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    words: &[&str],
) {
    let s = expect_err(r);
    assert_eq!(s.code(), code, "{s:?}");
    for w in words {
        assert!(s.message().contains(w), "{w:?} not in {:?}", s.message());
    }
}

async fn status_details(c: &mut ModuleServiceClient<Channel>) -> HashMap<String, String> {
    c.get_status(GetStatusRequest::default())
        .await
        .expect("GetStatus")
        .into_inner()
        .details
}

#[tokio::test(flavor = "multi_thread")]
async fn get_status_describes_the_registered_instance() {
    let sb = Sandbox::new();
    let (_nlb, m) = stack(&sb, "echo-status").await;
    // After the first acknowledged beat the heartbeat mode is known.
    let st = m
        .eventually("a first heartbeat over HeartbeatStream", || async {
            let s = m.status().await;
            (s["nlb"]["heartbeat_mode"] == "HeartbeatStream").then_some(s)
        })
        .await;
    let _conn = m.connect().await;
    let mut c = m.client().await;
    let s = c
        .get_status(GetStatusRequest {
            instance_id: "echo-status".into(),
        })
        .await
        .expect("GetStatus")
        .into_inner();
    assert_eq!(s.status, HealthStatus::Healthy as i32, "{s:?}");
    assert_eq!(s.message, "serving");
    assert!(s.last_updated.is_some());
    let inst = s.instance.expect("the instance");
    assert_eq!(inst.instance_id, "echo-status");
    assert_eq!(inst.module_type, ModuleType::Alb as i32);
    assert_eq!(inst.address, m.grpc_addr);
    assert_eq!(inst.metadata["data_address"], m.data_addr);
    assert_eq!(inst.metadata["admin_address"], m.admin_addr);
    assert_eq!(inst.metadata["module"], "echo");
    assert_eq!(inst.health_status, HealthStatus::Healthy as i32);
    assert_eq!(inst.version, ECHO_VERSION);
    assert_eq!(inst.current_connections, 1);
    assert_eq!(inst.traffic_weight, 0, "one version: weight not set");
    assert!(inst.started_at.is_some());

    let d = &s.details;
    assert_eq!(d["phase"], "serving");
    assert_eq!(d["module"], "echo");
    assert_eq!(d["registered"], "true");
    assert_eq!(
        serde_json::Value::String(d["registration_id"].clone()),
        st["nlb"]["registration_id"]
    );
    assert!(!d["registration_id"].is_empty());
    assert_eq!(d["data_address"], m.data_addr);
    assert_eq!(d["heartbeat_mode"], "HeartbeatStream");
    assert_eq!(d["active_connections"], "1");
    assert_eq!(d["active_version"], ECHO_VERSION);
    assert_eq!(d["own_weight"], "100");
    assert_eq!(d["version_weights"], format!("{ECHO_VERSION}=100"));
    assert_eq!(d["rate_limits"], "0");
    assert_eq!(d["auth"], "off");
    assert!(!d.contains_key("last_error"), "{d:?}");

    // An empty instance id means this instance; another one is NOT_FOUND.
    let s = c
        .get_status(GetStatusRequest::default())
        .await
        .expect("GetStatus without an id")
        .into_inner();
    assert_eq!(s.instance.unwrap().instance_id, "echo-status");
    assert_status(
        c.get_status(GetStatusRequest {
            instance_id: "echo-other".into(),
        })
        .await,
        Code::NotFound,
        &["echo-status", "echo-other"],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_rereads_the_module_section_and_keeps_it_when_the_file_is_broken() {
    let sb = Sandbox::new();
    let (_nlb, m) = stack_with(
        &sb,
        launch("echo-reload", Some("module:\n  greeting: first greeting\n")),
    )
    .await;
    let path = m.config_path.clone().expect("a config file");
    let first = m.connect().await;
    assert!(
        first.greeting.starts_with("first greeting (127.0.0.1:"),
        "{:?}",
        first.greeting
    );
    let mut c = m.client().await;

    std::fs::write(&path, "module:\n  greeting: second greeting\n").unwrap();
    let r = c
        .reload(ReloadRequest {
            instance_id: "echo-reload".into(),
            graceful: true,
            timeout_seconds: 20,
        })
        .await
        .expect("Reload")
        .into_inner();
    assert!(r.success, "{r:?}");
    assert!(r.message.contains("greeting and routes re-read"), "{r:?}");
    assert!(r.message.contains("0 token(s) in force"), "{r:?}");
    assert!(r.error.is_none());
    assert_eq!(greeting(&m).await, "second greeting");

    // A file that is not YAML, then a module section echo refuses: each
    // reload fails, says why, and the greeting in force stays.
    for (body, why) in [
        ("module:\n  greeting: [unclosed\n", "did not find expected"),
        (
            "module:\n  greeting: third greeting\n  colour: blue\n",
            "colour",
        ),
    ] {
        std::fs::write(&path, body).unwrap();
        let r = c
            .reload(ReloadRequest::default())
            .await
            .expect("Reload")
            .into_inner();
        assert!(!r.success, "{body:?}: {r:?}");
        assert!(
            r.message.contains("the config in force stays") && r.message.contains(why),
            "{body:?}: {r:?}"
        );
        let e = r.error.expect("an error");
        assert_eq!(e.code, pb::StatusCode::InvalidArgument as i32);
        assert_eq!(greeting(&m).await, "second greeting", "after {body:?}");
    }
    // The first connection was greeted once and still echoes.
    let mut first = first;
    assert_eq!(first.ask("still here").await.as_deref(), Some("still here"));
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_graceful_unregisters_finishes_connections_and_exits_0() {
    let sb = Sandbox::new();
    let (nlb, mut m) = stack(&sb, "echo-shutdown").await;
    let mut conn = m.connect().await;
    assert_eq!(conn.ask("hi").await.as_deref(), Some("hi"));
    let mut c = m.client().await;
    let r = c
        .shutdown(ShutdownRequest {
            instance_id: "echo-shutdown".into(),
            graceful: true,
            timeout_seconds: 20,
        })
        .await
        .expect("Shutdown")
        .into_inner();
    assert!(r.success, "{r:?}");
    assert!(
        r.message
            .contains("finishing 1 open connection(s) within 20s"),
        "{r:?}"
    );
    assert_eq!(
        conn.line().await.as_deref(),
        Some("bye: the module is closing this connection")
    );
    assert_eq!(conn.line().await, None, "closed after bye");
    let status = m.wait_exit().await;
    assert!(
        status.success(),
        "exit status {status}; stderr:\n{}",
        m.stderr()
    );
    assert!(
        m.stderr().contains("unregistered from the NLB"),
        "{}",
        m.stderr()
    );
    assert!(TcpStream::connect(&m.data_addr).await.is_err());
    let left: Vec<_> = nlb
        .client()
        .await
        .list_modules(ListModulesRequest::default())
        .await
        .expect("ListModules")
        .into_inner()
        .modules
        .into_iter()
        .filter(|i| i.instance_id == "echo-shutdown")
        .map(|i| i.health_status)
        .collect();
    assert!(
        left.is_empty() || left == [HealthStatus::Stopping as i32],
        "echo-shutdown at the NLB after Shutdown: {left:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn can_handle_accepts_tcp_routes_and_refuses_http_naming_tcp() {
    let sb = Sandbox::new();
    let (_nlb, m) = stack(&sb, "echo-can").await;
    let mut c = m.client().await;
    let yes = c
        .can_handle(CanHandleRequest {
            route: Some(route("t", Protocol::Tcp, 7000, 7)),
            context: HashMap::new(),
        })
        .await
        .expect("CanHandle")
        .into_inner();
    assert!(yes.can_handle, "{yes:?}");
    assert_eq!(yes.priority, 7);
    assert!(yes.reason.contains("PROTOCOL_TCP"), "{yes:?}");

    let no = c
        .can_handle(CanHandleRequest {
            route: Some(route("h", Protocol::Http, 80, 7)),
            context: HashMap::new(),
        })
        .await
        .expect("CanHandle")
        .into_inner();
    assert!(!no.can_handle, "{no:?}");
    assert!(
        no.reason.contains("PROTOCOL_TCP") && no.reason.contains("PROTOCOL_HTTP"),
        "{no:?}"
    );

    assert_status(
        c.can_handle(CanHandleRequest::default()).await,
        Code::InvalidArgument,
        &["route"],
    );
}

const FOUR_ROUTES: &str = "\
module:
  routes:
    - {route_id: echo, protocol: TCP, destination_port: 7000, priority: 1}
    - {route_id: alpha, protocol: TCP, destination_port: 7001, priority: 5}
    - {route_id: beta, protocol: TCP, destination_port: 7002, priority: 10}
    - {route_id: web, protocol: HTTP, destination_port: 8080, priority: 3}
";

#[tokio::test(flavor = "multi_thread")]
async fn get_routes_filters_sorts_and_pages() {
    let sb = Sandbox::new();
    let (nlb, m) = stack_with(&sb, launch("echo-routes", Some(FOUR_ROUTES))).await;
    assert_eq!(
        nlb_route_ids(&nlb, "echo-routes").await.unwrap(),
        ["alpha", "beta", "echo", "web"]
    );
    let mut c = m.client().await;
    let all = c
        .get_routes(GetRoutesRequest::default())
        .await
        .expect("GetRoutes")
        .into_inner();
    assert_eq!(ids(&all.routes), ["alpha", "beta", "echo", "web"]);
    assert_eq!(all.total_routes, 4);
    assert_eq!(
        all.pagination,
        Some(Pagination {
            page: 1,
            page_size: 50,
            total_items: 4,
            total_pages: 1
        })
    );
    let web = &all.routes[3];
    assert_eq!(
        (web.protocol, web.destination_port, web.priority),
        (Protocol::Http as i32, 8080, 3)
    );

    // TCP routes, highest priority first, two per page.
    let page = |n: i32| GetRoutesRequest {
        instance_id: "echo-routes".into(),
        query: Some(Query {
            filters: vec![Filter {
                field: "protocol".into(),
                operator: "eq".into(),
                value: "tcp".into(),
            }],
            sort_by: "priority".into(),
            sort_desc: true,
            pagination: Some(Pagination {
                page: n,
                page_size: 2,
                ..Pagination::default()
            }),
        }),
    };
    let p1 = c.get_routes(page(1)).await.expect("page 1").into_inner();
    assert_eq!(ids(&p1.routes), ["beta", "alpha"]);
    assert_eq!(
        p1.pagination,
        Some(Pagination {
            page: 1,
            page_size: 2,
            total_items: 3,
            total_pages: 2
        })
    );
    // total_routes counts all the module's routes, the pagination the
    // filtered ones.
    assert_eq!(p1.total_routes, 4);
    let p2 = c.get_routes(page(2)).await.expect("page 2").into_inner();
    assert_eq!(ids(&p2.routes), ["echo"]);
    assert_eq!(p2.pagination.unwrap().page, 2);
    let p3 = c.get_routes(page(3)).await.expect("page 3").into_inner();
    assert!(p3.routes.is_empty(), "{p3:?}");

    let q = |field: &str, operator: &str, value: &str| GetRoutesRequest {
        instance_id: String::new(),
        query: Some(Query {
            filters: vec![Filter {
                field: field.into(),
                operator: operator.into(),
                value: value.into(),
            }],
            ..Query::default()
        }),
    };
    let r = c
        .get_routes(q("route_id", "in", "web,alpha,nope"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&r.routes), ["alpha", "web"]);
    let r = c
        .get_routes(q("destination_port", "gt", "7001"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&r.routes), ["beta", "web"]);

    assert_status(
        c.get_routes(q("colour", "eq", "blue")).await,
        Code::InvalidArgument,
        &["colour"],
    );
    assert_status(
        c.get_routes(q("priority", "like", "1")).await,
        Code::InvalidArgument,
        &["like"],
    );
    assert_status(
        c.get_routes(GetRoutesRequest {
            instance_id: "someone-else".into(),
            query: None,
        })
        .await,
        Code::NotFound,
        &["someone-else"],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn update_and_delete_routes_are_announced_to_the_nlb() {
    let sb = Sandbox::new();
    let (nlb, m) = stack(&sb, "echo-upd").await;
    let mut c = m.client().await;
    assert_eq!(nlb_route_ids(&nlb, "echo-upd").await.unwrap(), ["echo"]);

    // Upsert: one new route, one changed.
    let r = c
        .update_routes(UpdateRoutesRequest {
            instance_id: "echo-upd".into(),
            routes: vec![
                route("extra", Protocol::Tcp, 7100, 2),
                route("echo", Protocol::Tcp, 7000, 9),
            ],
            replace_all: false,
        })
        .await
        .expect("UpdateRoutes")
        .into_inner();
    assert!(r.success, "{r:?}");
    assert_eq!(r.routes_updated, 2);
    assert!(r.message.contains("announced to the NLB"), "{r:?}");
    let got = c
        .get_routes(GetRoutesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .routes;
    assert_eq!(ids(&got), ["echo", "extra"]);
    assert_eq!((got[0].priority, got[1].destination_port), (9, 7100));
    let at_nlb = nlb
        .eventually("the NLB has echo (priority 9) and extra", || async {
            let i = info(&nlb, "echo-upd").await?;
            let mut routes = i.routes;
            routes.sort_by(|a, b| a.route_id.cmp(&b.route_id));
            (ids(&routes) == ["echo", "extra"] && routes[0].priority == 9).then_some(routes)
        })
        .await;
    assert_eq!(at_nlb[1].destination_port, 7100);

    // A bad route is refused and changes nothing.
    assert_status(
        c.update_routes(UpdateRoutesRequest {
            instance_id: String::new(),
            routes: vec![route("neg", Protocol::Tcp, 7200, -1)],
            replace_all: true,
        })
        .await,
        Code::InvalidArgument,
        &["neg", "priority"],
    );

    // Replace all.
    let r = c
        .update_routes(UpdateRoutesRequest {
            instance_id: String::new(),
            routes: vec![route("only", Protocol::Http, 8081, 0)],
            replace_all: true,
        })
        .await
        .expect("UpdateRoutes replace_all")
        .into_inner();
    assert!(r.success && r.routes_updated == 1, "{r:?}");
    let got = c
        .get_routes(GetRoutesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&got.routes), ["only"]);
    assert_eq!(got.total_routes, 1);
    nlb.eventually("the NLB has only `only`", || async {
        (nlb_route_ids(&nlb, "echo-upd").await? == ["only"]).then_some(())
    })
    .await;

    // Delete.
    let r = c
        .delete_route(DeleteRouteRequest {
            instance_id: "echo-upd".into(),
            route_id: "only".into(),
        })
        .await
        .expect("DeleteRoute")
        .into_inner();
    assert!(r.success, "{r:?}");
    assert!(r.message.contains("only"), "{r:?}");
    assert!(c
        .get_routes(GetRoutesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .routes
        .is_empty());
    nlb.eventually("the NLB has no route of echo-upd", || async {
        nlb_route_ids(&nlb, "echo-upd")
            .await?
            .is_empty()
            .then_some(())
    })
    .await;
    assert_status(
        c.delete_route(DeleteRouteRequest {
            instance_id: String::new(),
            route_id: "nope".into(),
        })
        .await,
        Code::NotFound,
        &["nope"],
    );
    // Re-announcing renewed the registration: the module stays registered.
    let st = m.status().await;
    assert_eq!(st["nlb"]["registered"], true, "{st}");
    assert!(st["nlb"]["last_error"].is_null(), "{st}");
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limits_are_set_listed_enforced_and_removed() {
    let sb = Sandbox::new();
    let (_nlb, m) = stack(&sb, "echo-rl").await;
    let mut c = m.client().await;
    let none = c
        .get_rate_limits(GetRateLimitsRequest::default())
        .await
        .expect("GetRateLimits")
        .into_inner();
    assert!(none.limits.is_empty() && none.total_limits == 0, "{none:?}");

    let limit = RateLimit {
        target: "route:echo".into(),
        requests_per_second: 1,
        burst_size: 2,
        enabled: true,
        metadata: [("per".to_string(), "client".to_string())].into(),
        ..RateLimit::default()
    };
    let r = c
        .set_rate_limit(SetRateLimitRequest {
            instance_id: "echo-rl".into(),
            limit: Some(limit.clone()),
        })
        .await
        .expect("SetRateLimit")
        .into_inner();
    assert!(r.success, "{r:?}");
    assert!(
        r.message.contains("rl-1") && r.message.contains("in force"),
        "{r:?}"
    );

    let listed = c
        .get_rate_limits(GetRateLimitsRequest {
            instance_id: String::new(),
            target: "route:echo".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.total_limits, 1);
    assert_eq!(
        listed.limits,
        [RateLimit {
            limit_id: "rl-1".into(),
            ..limit.clone()
        }]
    );
    let other = c
        .get_rate_limits(GetRateLimitsRequest {
            instance_id: String::new(),
            target: "*".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(other.limits.is_empty(), "{other:?}");
    assert_eq!(status_details(&mut c).await["rate_limits"], "1");

    // Three lines sent at once: a burst of 2, then a refusal.
    let mut conn = m.connect().await;
    assert_eq!(conn.ask("one\ntwo\nthree").await.as_deref(), Some("one"));
    assert_eq!(conn.line().await.as_deref(), Some("two"));
    assert_eq!(
        conn.line().await.as_deref(),
        Some("rate limited: retry in 1s")
    );
    let stats = c
        .get_stats(GetStatsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    assert_eq!(stats.custom_stats["rate_limit.rl-1.admitted"], "2");
    assert_eq!(stats.custom_stats["rate_limit.rl-1.refused"], "1");

    // Invalid limits are refused, naming the field; nothing changes.
    for (bad, field) in [
        (
            RateLimit {
                requests_per_second: -5,
                ..limit.clone()
            },
            "requests_per_second",
        ),
        (
            RateLimit {
                requests_per_second: 0,
                requests_per_minute: 10,
                burst_size: 5,
                ..limit.clone()
            },
            "burst_size",
        ),
        (
            RateLimit {
                target: String::new(),
                ..limit.clone()
            },
            "target",
        ),
        (
            RateLimit {
                metadata: [("per".to_string(), "server".to_string())].into(),
                ..limit.clone()
            },
            "per",
        ),
    ] {
        assert_status(
            c.set_rate_limit(SetRateLimitRequest {
                instance_id: String::new(),
                limit: Some(bad),
            })
            .await,
            Code::InvalidArgument,
            &[field],
        );
    }
    assert_status(
        c.set_rate_limit(SetRateLimitRequest::default()).await,
        Code::InvalidArgument,
        &["limit"],
    );
    let listed = c
        .get_rate_limits(GetRateLimitsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids_of_limits(&listed.limits), ["rl-1"]);

    // Removed: lines echo again, as many as sent.
    let r = c
        .remove_rate_limit(RemoveRateLimitRequest {
            instance_id: String::new(),
            limit_id: "rl-1".into(),
        })
        .await
        .expect("RemoveRateLimit")
        .into_inner();
    assert!(r.success, "{r:?}");
    assert!(c
        .get_rate_limits(GetRateLimitsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .limits
        .is_empty());
    assert_eq!(conn.ask("four\nfive\nsix").await.as_deref(), Some("four"));
    assert_eq!(conn.line().await.as_deref(), Some("five"));
    assert_eq!(conn.line().await.as_deref(), Some("six"));
    assert_status(
        c.remove_rate_limit(RemoveRateLimitRequest {
            instance_id: String::new(),
            limit_id: "rl-1".into(),
        })
        .await,
        Code::NotFound,
        &["rl-1"],
    );
    assert_eq!(status_details(&mut c).await["rate_limits"], "0");
}

fn ids_of_limits(limits: &[RateLimit]) -> Vec<String> {
    limits.iter().map(|l| l.limit_id.clone()).collect()
}

/// The value of the one sample named `name` without labels.
fn sample(metrics: &pb::ModuleMetrics, name: &str) -> Option<f64> {
    metrics
        .metrics
        .iter()
        .find(|p| p.name == name && p.labels.is_empty())
        .map(|p| p.value)
}

#[tokio::test(flavor = "multi_thread")]
async fn get_metrics_filters_by_name_and_counts_the_connections() {
    let sb = Sandbox::new();
    let (_nlb, m) = stack(&sb, "echo-metrics").await;
    let mut conns = Vec::new();
    for _ in 0..3 {
        conns.push(m.connect().await);
    }
    assert_eq!(conns[0].ask("x").await.as_deref(), Some("x"));
    let mut c = m.client().await;
    let names = ["module_connections_total", "module_connections_active"];
    let got = c
        .get_metrics(GetMetricsRequest {
            instance_id: "echo-metrics".into(),
            metric_names: names.iter().map(|s| s.to_string()).collect(),
            ..GetMetricsRequest::default()
        })
        .await
        .expect("GetMetrics")
        .into_inner();
    assert!(got.collected_at.is_some());
    let metrics = got.metrics.expect("metrics");
    assert_eq!(metrics.instance_id, "echo-metrics");
    assert_eq!(metrics.module_type, ModuleType::Alb as i32);
    let mut seen: Vec<&str> = metrics.metrics.iter().map(|p| p.name.as_str()).collect();
    seen.sort();
    assert_eq!(
        seen,
        ["module_connections_active", "module_connections_total"]
    );
    assert_eq!(sample(&metrics, "module_connections_total"), Some(3.0));
    assert_eq!(sample(&metrics, "module_connections_active"), Some(3.0));
    assert!(metrics.metrics.iter().all(|p| p.timestamp.is_some()));

    // One connection ends: active follows, the total does not go back.
    drop(conns.pop());
    m.eventually("2 active connections in GetMetrics", || {
        let mut c = c.clone();
        async move {
            let got = c
                .get_metrics(GetMetricsRequest {
                    metric_names: vec!["module_connections_active".into()],
                    ..GetMetricsRequest::default()
                })
                .await
                .ok()?
                .into_inner()
                .metrics?;
            (sample(&got, "module_connections_active") == Some(2.0)).then_some(())
        }
    })
    .await;

    // Without names: every sample /metrics serves, plus the percentiles.
    let all = c
        .get_metrics(GetMetricsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .metrics
        .unwrap();
    assert_eq!(sample(&all, "module_connections_total"), Some(3.0));
    let ok_requests = all
        .metrics
        .iter()
        .find(|p| {
            p.name == "module_requests_total"
                && p.labels.get("result").map(String::as_str) == Some("ok")
        })
        .map(|p| p.value);
    assert_eq!(ok_requests, Some(1.0));
    assert!(all
        .metrics
        .iter()
        .any(|p| p.name == "module_request_duration_seconds_count" && p.value == 1.0));
    let mut quantiles: Vec<&str> = all
        .metrics
        .iter()
        .filter(|p| p.name == "module_request_latency_ms")
        .map(|p| p.labels["quantile"].as_str())
        .collect();
    quantiles.sort();
    assert_eq!(quantiles, ["0.5", "0.95", "0.99"]);
    let text = m.get("/metrics").await.body;
    assert_eq!(metric_value(&text, "module_connections_total"), Some(3.0));

    let none = c
        .get_metrics(GetMetricsRequest {
            metric_names: vec!["no_such_metric".into()],
            ..GetMetricsRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .metrics
        .unwrap();
    assert!(none.metrics.is_empty(), "{none:?}");
    assert_status(
        c.get_metrics(GetMetricsRequest {
            instance_id: "echo-other".into(),
            ..GetMetricsRequest::default()
        })
        .await,
        Code::NotFound,
        &["echo-other"],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn scale_without_a_scaler_is_failed_precondition() {
    let sb = Sandbox::new();
    let (_nlb, m) = stack(&sb, "echo-scale").await;
    let mut c = m.client().await;
    let config = ScalingConfig {
        min_instances: 2,
        max_instances: 4,
        ..ScalingConfig::default()
    };
    assert_status(
        c.scale(ScaleRequest {
            instance_id: "echo-scale".into(),
            config: Some(config),
            immediate: true,
        })
        .await,
        Code::FailedPrecondition,
        &["no scaler", "echo-scale"],
    );
    // The config is checked first: a bad one is INVALID_ARGUMENT naming it.
    assert_status(
        c.scale(ScaleRequest {
            instance_id: String::new(),
            config: Some(ScalingConfig {
                min_instances: 5,
                max_instances: 2,
                ..ScalingConfig::default()
            }),
            immediate: false,
        })
        .await,
        Code::InvalidArgument,
        &["min_instances"],
    );
    assert_status(
        c.scale(ScaleRequest::default()).await,
        Code::InvalidArgument,
        &["config"],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn get_instances_lists_this_instance_and_filters() {
    let sb = Sandbox::new();
    let (_nlb, m) = stack(&sb, "echo-inst").await;
    let mut c = m.client().await;
    let all = c
        .get_instances(GetInstancesRequest::default())
        .await
        .expect("GetInstances")
        .into_inner();
    assert_eq!(all.total_instances, 1);
    let me = &all.instances[0];
    assert_eq!(me.instance_id, "echo-inst");
    assert_eq!(me.address, m.grpc_addr);
    assert_eq!(me.metadata["data_address"], m.data_addr);
    assert_eq!(me.health_status, HealthStatus::Healthy as i32);
    for (module_type, status, n) in [
        (ModuleType::Alb, HealthStatus::Unspecified, 1),
        (ModuleType::Dblb, HealthStatus::Unspecified, 0),
        (ModuleType::Unspecified, HealthStatus::Healthy, 1),
        (ModuleType::Unspecified, HealthStatus::Unhealthy, 0),
        (ModuleType::Alb, HealthStatus::Stopping, 0),
    ] {
        let r = c
            .get_instances(GetInstancesRequest {
                module_type: module_type as i32,
                status_filter: status as i32,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (r.instances.len(), r.total_instances),
            (n, n as i32),
            "{module_type:?} {status:?}: {r:?}"
        );
        if n == 1 {
            assert_eq!(r.instances[0].instance_id, "echo-inst");
        }
    }
}

/// The weights as `GetActiveVersion` gives them, sorted by version.
async fn weights(c: &mut ModuleServiceClient<Channel>) -> (String, Vec<(String, i32)>) {
    let v = c
        .get_active_version(GetActiveVersionRequest::default())
        .await
        .expect("GetActiveVersion")
        .into_inner();
    let mut w: Vec<(String, i32)> = v.version_weights.into_iter().collect();
    w.sort();
    assert_eq!(w.iter().map(|(_, w)| w).sum::<i32>(), 100, "{w:?}");
    let bg = v.config.expect("a BlueGreenConfig");
    assert_eq!(bg.active_version, v.active_version);
    assert_eq!(bg.blue_version, v.active_version);
    (v.active_version, w)
}

fn pairs(p: &[(&str, i32)]) -> Vec<(String, i32)> {
    p.iter().map(|(v, w)| (v.to_string(), *w)).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn weights_promotion_and_rollback_tell_one_story() {
    let sb = Sandbox::new();
    let (_nlb, m) = stack(&sb, "echo-ver").await;
    let mut c = m.client().await;
    let v1 = ECHO_VERSION;
    assert_eq!(weights(&mut c).await, (v1.to_string(), pairs(&[(v1, 100)])));
    // No earlier version: a rollback needs a target.
    assert_status(
        c.rollback(RollbackRequest::default()).await,
        Code::FailedPrecondition,
        &["target_version"],
    );

    // A canary of 0.2.0 at 20 %.
    let r = c
        .set_traffic_weight(SetTrafficWeightRequest {
            instance_id: "echo-ver".into(),
            version: "0.2.0".into(),
            weight: 20,
        })
        .await
        .expect("SetTrafficWeight")
        .into_inner();
    assert!(r.success, "{r:?}");
    let bg = r.current_config.expect("current_config");
    assert_eq!(
        (
            bg.blue_version.as_str(),
            bg.blue_weight,
            bg.green_version.as_str(),
            bg.green_weight
        ),
        (v1, 80, "0.2.0", 20)
    );
    assert!(bg.canary_enabled && bg.canary_percent == 20, "{bg:?}");
    assert!(bg.deployment_started.is_some());
    assert_eq!(
        weights(&mut c).await,
        (v1.to_string(), pairs(&[(v1, 80), ("0.2.0", 20)]))
    );
    let d = status_details(&mut c).await;
    assert_eq!(d["active_version"], v1);
    assert_eq!(d["own_weight"], "80");
    assert_eq!(d["version_weights"], format!("{v1}=80,0.2.0=20"));
    // With two versions weighted, the instance reports its own weight.
    let s = c
        .get_status(GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.instance.unwrap().traffic_weight, 80);

    // Out-of-range and malformed requests change nothing.
    assert_status(
        c.set_traffic_weight(SetTrafficWeightRequest {
            instance_id: String::new(),
            version: "0.2.0".into(),
            weight: 101,
        })
        .await,
        Code::InvalidArgument,
        &["101", "0-100"],
    );
    assert_status(
        c.promote_version(PromoteVersionRequest {
            instance_id: String::new(),
            version: "bad version".into(),
            immediate: false,
            promotion_rate: 10,
        })
        .await,
        Code::InvalidArgument,
        &["bad version"],
    );
    assert_eq!(
        weights(&mut c).await,
        (v1.to_string(), pairs(&[(v1, 80), ("0.2.0", 20)]))
    );

    // Promotion step by step: 20 -> 60 -> 100, active at 100.
    let p = c
        .promote_version(PromoteVersionRequest {
            instance_id: String::new(),
            version: "0.2.0".into(),
            immediate: false,
            promotion_rate: 40,
        })
        .await
        .expect("PromoteVersion")
        .into_inner();
    assert!(p.success, "{p:?}");
    assert_eq!(p.promoted_version, "0.2.0");
    assert_eq!(p.message, "0.2.0 now takes 60%");
    assert_eq!(
        weights(&mut c).await,
        (v1.to_string(), pairs(&[(v1, 40), ("0.2.0", 60)]))
    );
    let p = c
        .promote_version(PromoteVersionRequest {
            instance_id: String::new(),
            version: "0.2.0".into(),
            immediate: false,
            promotion_rate: 40,
        })
        .await
        .expect("PromoteVersion")
        .into_inner();
    assert_eq!(p.message, "0.2.0 is the active version at 100%");
    assert_eq!(
        weights(&mut c).await,
        ("0.2.0".to_string(), pairs(&[("0.2.0", 100)]))
    );
    let d = status_details(&mut c).await;
    assert_eq!(d["active_version"], "0.2.0");
    assert_eq!(d["own_weight"], "0", "this instance runs {v1}");
    assert_eq!(d["version_weights"], "0.2.0=100");

    // Rollback returns to the version that was active before.
    let r = c
        .rollback(RollbackRequest::default())
        .await
        .expect("Rollback")
        .into_inner();
    assert!(r.success, "{r:?}");
    assert_eq!(
        (r.previous_version.as_str(), r.current_version.as_str()),
        ("0.2.0", v1)
    );
    assert_eq!(weights(&mut c).await, (v1.to_string(), pairs(&[(v1, 100)])));
    let d = status_details(&mut c).await;
    assert_eq!(d["active_version"], v1);
    assert_eq!(d["own_weight"], "100");
    assert_eq!(d["version_weights"], format!("{v1}=100"));
    let bg = c
        .get_active_version(GetActiveVersionRequest::default())
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert!(bg.green_version.is_empty() && !bg.canary_enabled, "{bg:?}");
    assert!(bg.deployment_started.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn health_check_reports_phase_nlb_and_connections() {
    let sb = Sandbox::new();
    let (_nlb, m) = stack(&sb, "echo-health").await;
    let mut c = m.client().await;
    let h = c
        .health_check(HealthCheckRequest {
            instance_id: "echo-health".into(),
            deep_check: false,
        })
        .await
        .expect("HealthCheck")
        .into_inner();
    assert_eq!(h.status, HealthStatus::Healthy as i32, "{h:?}");
    assert_eq!(h.message, "serving");
    assert_eq!(h.checks["phase"], "serving");
    assert_eq!(h.checks["nlb"], "registered");
    assert_eq!(h.checks["connections"], "0");
    assert!(h.checked_at.is_some());
    let _conn = m.connect().await;
    let deep = c
        .health_check(HealthCheckRequest {
            instance_id: String::new(),
            deep_check: true,
        })
        .await
        .expect("deep HealthCheck")
        .into_inner();
    assert_eq!(deep.status, HealthStatus::Healthy as i32, "{deep:?}");
    assert_eq!(deep.checks["phase"], "serving");
    assert_eq!(deep.checks["nlb"], "registered");
    assert_eq!(deep.checks["connections"], "1");

    // A module with no NLB to register with is STARTING, and says why.
    let lonely = start_echo(sb.path(), NOWHERE, &launch("echo-lonely", None)).await;
    let h = lonely
        .eventually("a failed registration", || async {
            let text = lonely.try_get("/metrics").await?.body;
            metric_value(&text, r#"module_registrations_total{result="error"}"#)
                .filter(|n| *n >= 1.0)?;
            let mut c = lonely.client().await;
            c.health_check(HealthCheckRequest {
                instance_id: String::new(),
                deep_check: true,
            })
            .await
            .ok()
            .map(|r| r.into_inner())
        })
        .await;
    assert_eq!(h.status, HealthStatus::Starting as i32, "{h:?}");
    assert_eq!(h.checks["phase"], "starting");
    assert!(h.checks["nlb"].contains("registration"), "{h:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn get_stats_counts_traffic_and_reset_starts_a_new_span() {
    let sb = Sandbox::new();
    let (_nlb, m) = stack(&sb, "echo-gs").await;
    let mut conn = m.connect().await;
    for i in 0..3 {
        let line = format!("line-{i}");
        assert_eq!(conn.ask(&line).await, Some(line));
    }
    let mut c = m.client().await;
    let s = c
        .get_stats(GetStatsRequest {
            instance_id: "echo-gs".into(),
            reset_counters: false,
        })
        .await
        .expect("GetStats")
        .into_inner()
        .stats
        .expect("stats");
    assert_eq!(s.instance_id, "echo-gs");
    assert_eq!(
        (s.total_requests, s.successful_requests, s.failed_requests),
        (3, 3, 0)
    );
    assert_eq!((s.total_connections, s.active_connections), (1, 1));
    // "line-N\n" is 7 bytes each way, plus the greeting line out.
    assert_eq!(s.bytes_received, 21);
    assert_eq!(s.bytes_sent, 21 + conn.greeting.len() as i64 + 1);
    assert!(
        s.avg_latency_ms > 0.0 && s.p99_latency_ms >= s.p50_latency_ms,
        "{s:?}"
    );
    assert_eq!(s.custom_stats["greeting_bytes"], "15");
    let since = s.since.expect("since");

    // The reset answers the span that ends, then counts from zero.
    let ended = c
        .get_stats(GetStatsRequest {
            instance_id: String::new(),
            reset_counters: true,
        })
        .await
        .expect("GetStats reset")
        .into_inner()
        .stats
        .unwrap();
    assert_eq!((ended.total_requests, ended.total_connections), (3, 1));
    assert_eq!(ended.since, Some(since));
    let fresh = c
        .get_stats(GetStatsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    assert_eq!(
        (
            fresh.total_requests,
            fresh.successful_requests,
            fresh.failed_requests,
            fresh.total_connections,
            fresh.bytes_received,
            fresh.bytes_sent
        ),
        (0, 0, 0, 0, 0, 0),
        "{fresh:?}"
    );
    assert_eq!(fresh.active_connections, 1, "the connection is still open");
    assert_eq!(fresh.p50_latency_ms, 0.0, "{fresh:?}");
    let new_since = fresh.since.expect("since");
    assert!(
        (new_since.seconds, new_since.nanos) > (since.seconds, since.nanos),
        "{since:?} -> {new_since:?}"
    );

    assert_eq!(conn.ask("after").await.as_deref(), Some("after"));
    let after = c
        .get_stats(GetStatsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    assert_eq!((after.total_requests, after.bytes_received), (1, 6));
    // Prometheus counters never go back.
    let text = m.get("/metrics").await.body;
    assert_eq!(
        metric_value(&text, r#"module_requests_total{result="ok"}"#),
        Some(4.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_metrics_sends_the_named_metrics_every_interval() {
    let sb = Sandbox::new();
    let (_nlb, m) = stack(&sb, "echo-stream").await;
    let _a = m.connect().await;
    let _b = m.connect().await;
    let mut c = m.client().await;
    let mut stream = c
        .stream_metrics(StreamMetricsRequest {
            instance_id: "echo-stream".into(),
            interval_seconds: 1,
            metric_names: vec!["module_connections_total".into()],
        })
        .await
        .expect("StreamMetrics")
        .into_inner();
    let mut got = Vec::new();
    for i in 0..2 {
        let msg = tokio::time::timeout(CALL_DEADLINE, stream.message())
            .await
            .unwrap_or_else(|_| panic!("message {i} within {CALL_DEADLINE:?}"))
            .expect("a message, not an error")
            .expect("a message, not the end of the stream");
        got.push(msg);
    }
    for (i, msg) in got.iter().enumerate() {
        let metrics = msg.metrics.as_ref().expect("metrics");
        assert_eq!(metrics.instance_id, "echo-stream", "message {i}");
        assert_eq!(metrics.metrics.len(), 1, "message {i}: {metrics:?}");
        assert_eq!(
            sample(metrics, "module_connections_total"),
            Some(2.0),
            "message {i}"
        );
        assert_eq!(msg.timestamp, metrics.collected_at, "message {i}");
    }
    let (t0, t1) = (got[0].timestamp.unwrap(), got[1].timestamp.unwrap());
    assert!(
        (t1.seconds, t1.nanos) > (t0.seconds, t0.nanos),
        "{t0:?} {t1:?}"
    );

    assert_status(
        c.stream_metrics(StreamMetricsRequest {
            instance_id: "echo-other".into(),
            interval_seconds: 1,
            metric_names: vec![],
        })
        .await,
        Code::NotFound,
        &["echo-other"],
    );
}

fn greeting_section(c: &pb::GetConfigResponse) -> &ConfigUpdate {
    assert_eq!(c.configs.len(), 1, "{c:?}");
    let s = &c.configs[0];
    assert_eq!(s.config_type, "greeting");
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn get_config_shows_the_greeting_section_with_its_checksum() {
    let sb = Sandbox::new();
    let (_nlb, m) = stack(&sb, "echo-gc").await;
    let mut c = m.client().await;
    for config_type in ["", "greeting"] {
        let got = c
            .get_config(GetConfigRequest {
                instance_id: "echo-gc".into(),
                config_type: config_type.into(),
            })
            .await
            .expect("GetConfig")
            .into_inner();
        assert!(got.last_updated.is_some());
        let s = greeting_section(&got);
        assert_eq!(s.config_id, "echo-gc/greeting");
        assert_eq!(s.config_data, DEFAULT_GREETING.as_bytes());
        assert_eq!(s.checksum, sha256_hex(DEFAULT_GREETING.as_bytes()));
    }
    assert_status(
        c.get_config(GetConfigRequest {
            instance_id: String::new(),
            config_type: "colours".into(),
        })
        .await,
        Code::NotFound,
        &["colours", "greeting"],
    );
}

fn update(data: &str, checksum: String, validate_only: bool) -> UpdateConfigRequest {
    UpdateConfigRequest {
        instance_id: String::new(),
        config: Some(ConfigUpdate {
            config_type: "greeting".into(),
            config_data: data.as_bytes().to_vec(),
            checksum,
            ..ConfigUpdate::default()
        }),
        validate_only,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn update_config_validates_applies_and_refuses() {
    let sb = Sandbox::new();
    let (_nlb, m) = stack(&sb, "echo-uc").await;
    let mut c = m.client().await;

    // validate_only: valid, and nothing changes.
    let r = c
        .update_config(update(
            "only validated",
            sha256_hex(b"only validated"),
            true,
        ))
        .await
        .expect("UpdateConfig validate_only")
        .into_inner();
    assert!(r.success && r.validation_passed, "{r:?}");
    assert!(r.message.contains("nothing changed"), "{r:?}");
    assert_eq!(greeting(&m).await, DEFAULT_GREETING);

    // A real update: the next connection is greeted with it.
    let r = c
        .update_config(update(
            "updated greeting",
            sha256_hex(b"updated greeting"),
            false,
        ))
        .await
        .expect("UpdateConfig")
        .into_inner();
    assert!(r.success && r.validation_passed, "{r:?}");
    assert!(r.validation_errors.is_empty() && r.error.is_none(), "{r:?}");
    assert_eq!(greeting(&m).await, "updated greeting");
    let got = c
        .get_config(GetConfigRequest::default())
        .await
        .unwrap()
        .into_inner();
    let s = greeting_section(&got);
    assert_eq!(s.config_data, b"updated greeting");
    assert_eq!(s.checksum, sha256_hex(b"updated greeting"));
    // No checksum is accepted too.
    let r = c
        .update_config(update("no checksum", String::new(), false))
        .await
        .unwrap()
        .into_inner();
    assert!(r.success, "{r:?}");
    assert_eq!(greeting(&m).await, "no checksum");

    // A checksum that does not match the data.
    assert_status(
        c.update_config(update("mismatched", sha256_hex(b"something else"), false))
            .await,
        Code::InvalidArgument,
        &["checksum", &sha256_hex(b"mismatched")],
    );
    // A value echo refuses: success = false with the validation errors.
    let two_lines = "two\nlines";
    let r = c
        .update_config(update(two_lines, sha256_hex(two_lines.as_bytes()), false))
        .await
        .expect("UpdateConfig with an invalid value")
        .into_inner();
    assert!(!r.success && !r.validation_passed, "{r:?}");
    assert_eq!(
        r.validation_errors,
        ["greeting: must be one non-empty line"]
    );
    assert_eq!(
        r.error.as_ref().map(|e| e.code),
        Some(pb::StatusCode::InvalidArgument as i32)
    );
    assert!(r.message.contains("the config in force stays"), "{r:?}");
    // validate_only reports the same errors.
    let r = c
        .update_config(update("", String::new(), true))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.success && !r.validation_passed, "{r:?}");
    assert_eq!(
        r.validation_errors,
        ["greeting: must be one non-empty line"]
    );
    // A section echo does not have.
    let r = c
        .update_config(UpdateConfigRequest {
            instance_id: String::new(),
            config: Some(ConfigUpdate {
                config_type: "colours".into(),
                config_data: b"blue".to_vec(),
                ..ConfigUpdate::default()
            }),
            validate_only: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.success, "{r:?}");
    assert!(
        r.validation_errors.len() == 1 && r.validation_errors[0].contains("colours"),
        "{r:?}"
    );
    assert_status(
        c.update_config(UpdateConfigRequest::default()).await,
        Code::InvalidArgument,
        &["config"],
    );
    assert_eq!(greeting(&m).await, "no checksum");
}

const PROXY_CONFIG: &str = "\
data:
  proxy_protocol: true
  proxy_header_timeout_ms: 1000
";

async fn next_line(
    lines: &mut tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
) -> Option<String> {
    tokio::time::timeout(CALL_DEADLINE, lines.next_line())
        .await
        .expect("a line within the call deadline")
        .expect("read a line")
}

/// Reads until the peer closes (a reset counts as closed); returns what came.
async fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let n = tokio::time::timeout(CALL_DEADLINE, s.read(&mut buf))
            .await
            .expect("the module closes the connection within the call deadline");
        match n {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_v2_gives_the_client_address_and_connections_without_a_header_are_refused() {
    let sb = Sandbox::new();
    let (nlb, m) = stack_with(&sb, launch("echo-proxy", Some(PROXY_CONFIG))).await;
    let details = info(&nlb, "echo-proxy").await.expect("registered").details;
    assert_eq!(details["capability.proxy_protocol"], "v2", "{details:?}");
    assert_eq!(details["proxy_protocol"], "v2", "{details:?}");

    // The header and the first line in one write: the SDK takes the header
    // and leaves the line to the module.
    let src: SocketAddr = "203.0.113.7:4444".parse().unwrap();
    let dst: SocketAddr = m.data_addr.parse().unwrap();
    let mut first = proxy_v2::encode(&Header::proxy(src, dst)).expect("encode");
    first.extend_from_slice(b"ping\n");
    let s = TcpStream::connect(&m.data_addr).await.expect("connect");
    let (r, mut w) = s.into_split();
    let mut lines = BufReader::new(r).lines();
    w.write_all(&first).await.unwrap();
    assert_eq!(
        next_line(&mut lines).await.as_deref(),
        Some("hello from echo (203.0.113.7:4444)")
    );
    assert_eq!(next_line(&mut lines).await.as_deref(), Some("ping"));

    // Bytes that are not a PROXY v2 header: closed, no greeting.
    let mut s = TcpStream::connect(&m.data_addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&read_until_closed(&mut s).await),
        ""
    );
    // Nothing at all: closed at the header deadline, no greeting.
    let mut s = TcpStream::connect(&m.data_addr).await.expect("connect");
    assert_eq!(
        String::from_utf8_lossy(&read_until_closed(&mut s).await),
        ""
    );
    let text = m.get("/metrics").await.body;
    assert_eq!(
        metric_value(
            &text,
            r#"module_refused_connections_total{reason="proxy_header"}"#
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            r#"module_refused_connections_total{reason="max_connections"}"#
        ),
        Some(0.0)
    );
}

// Bugs found in the SDK: each test asserts what the docs promise and is
// ignored until the SDK does it.

const ONE_ROUTE: &str = "\
module:
  routes:
    - {route_id: echo, protocol: TCP, destination_port: 7000}
";

#[tokio::test(flavor = "multi_thread")]
async fn reload_announces_changed_routes_to_the_nlb() {
    let sb = Sandbox::new();
    let (nlb, m) = stack_with(&sb, launch("echo-reroute", Some(ONE_ROUTE))).await;
    assert_eq!(nlb_route_ids(&nlb, "echo-reroute").await.unwrap(), ["echo"]);
    let two_routes =
        format!("{ONE_ROUTE}    - {{route_id: extra, protocol: TCP, destination_port: 7001}}\n");
    std::fs::write(m.config_path.as_ref().unwrap(), two_routes).unwrap();
    let mut c = m.client().await;
    let r = c
        .reload(ReloadRequest::default())
        .await
        .expect("Reload")
        .into_inner();
    assert!(r.success, "{r:?}");
    let got = c
        .get_routes(GetRoutesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&got.routes), ["echo", "extra"]);
    nlb.eventually("the NLB has the reloaded routes echo and extra", || async {
        (nlb_route_ids(&nlb, "echo-reroute").await? == ["echo", "extra"]).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_refused_for_their_proxy_header_are_not_counted_as_served() {
    let sb = Sandbox::new();
    let (_nlb, m) = stack_with(&sb, launch("echo-proxy-count", Some(PROXY_CONFIG))).await;
    let mut s = TcpStream::connect(&m.data_addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
        .await
        .unwrap();
    assert!(read_until_closed(&mut s).await.is_empty());
    let text = m.get("/metrics").await.body;
    assert_eq!(
        metric_value(
            &text,
            r#"module_refused_connections_total{reason="proxy_header"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&text, "module_connections_total"),
        Some(0.0),
        "refused, so never handed to the module"
    );
    let stats = m
        .client()
        .await
        .get_stats(GetStatsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    assert_eq!(stats.total_connections, 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_route_the_nlb_refuses_does_not_take_the_module_out_of_the_nlb() {
    let sb = Sandbox::new();
    let (nlb, m) = stack(&sb, "echo-udp").await;
    let mut c = m.client().await;
    let r = c
        .update_routes(UpdateRoutesRequest {
            instance_id: String::new(),
            routes: vec![route("dns", Protocol::Udp, 53, 0)],
            replace_all: false,
        })
        .await;
    if let Err(s) = r {
        // Refusing the route up front is one right answer.
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        let routes = c
            .get_routes(GetRoutesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .routes;
        assert_eq!(ids(&routes), ["echo"]);
        return;
    }
    // Accepting it and keeping the registration alive is the other.
    let text = m
        .eventually("the module announced its routes again", || async {
            let text = m.try_get("/metrics").await?.body;
            let ok = metric_value(&text, r#"module_registrations_total{result="ok"}"#)?;
            let err = metric_value(&text, r#"module_registrations_total{result="error"}"#)?;
            (ok + err >= 2.0).then_some(text)
        })
        .await;
    assert_eq!(
        metric_value(&text, r#"module_registrations_total{result="error"}"#),
        Some(0.0),
        "the NLB refused the announcement: {}",
        m.status().await
    );
    let inst = info(&nlb, "echo-udp").await.unwrap().instance.unwrap();
    assert_eq!(inst.health_status, HealthStatus::Healthy as i32);
}
