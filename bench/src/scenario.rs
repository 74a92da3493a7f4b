//! The benchmark's world: the NLB config (operator routes, a static pool,
//! version weights), the module instances that register with data addresses
//! and announce routes, and the connections `RouteRequest` describes.
//!
//! Addresses are loopback and never dialled: `RouteRequest` only decides.

use shared_types::pb::{self, HealthStatus, ModuleType, Protocol};

/// The NLB config for the benchmarks. Active health checks are off: no
/// ModuleService listens at the registered addresses, so with checks on the
/// NLB would spend the run dialling dead addresses (10,000 of them in the
/// fleet run) and mark every instance unhealthy; liveness is the heartbeat
/// lease alone.
pub const NLB_CONFIG: &str = r#"# Written by control-bench config (scripts/bench.sh control).
# A stream per instance in the streaming fleet: 10,000 over a few connections.
grpc:
  max_concurrent_streams: 20000
health:
  active_checks: false
registry:
  max_instances: 20000
backends:
  metrics-gw:
    - "127.0.0.1:19091"
    - "127.0.0.1:19092"
routes:
  - route_id: web-https
    protocol: https
    destination_pattern: "*.example.com"
    destination_port: 443
    priority: 10
    metadata: {module_type: alb}
  - route_id: web-http-api
    protocol: http
    destination_pattern: api.example.com
    destination_port: 80
    priority: 10
    path_pattern: "/v1/*"
    metadata: {module_type: alb}
  - route_id: grpc-internal
    protocol: grpc
    source_pattern: 10.0.0.0/8
    destination_port: 50061
    metadata: {module_type: alb}
  - route_id: pg-main
    protocol: postgres
    source_pattern: 10.0.0.0/8
    destination_port: 5432
    priority: 5
    metadata: {module_type: dblb}
  - route_id: metrics-fallback
    protocol: tcp
    destination_port: 9091
    metadata: {backend: metrics-gw}
traffic_weights:
  alb:
    "1.4.2": 90
    "1.5.0": 10
"#;

/// Routes modules announce (each instance announces one of these).
fn announced_route(kind: usize) -> pb::Route {
    match kind % 3 {
        0 => pb::Route {
            route_id: "shop-https".into(),
            protocol: Protocol::Https as i32,
            destination_pattern: "shop.example.net".into(),
            destination_port: 443,
            priority: 20,
            ..Default::default()
        },
        1 => pb::Route {
            route_id: "ws-chat".into(),
            protocol: Protocol::Websocket as i32,
            destination_pattern: "chat.example.net".into(),
            destination_port: 80,
            priority: 20,
            ..Default::default()
        },
        _ => pb::Route {
            route_id: "redis-cache".into(),
            protocol: Protocol::Redis as i32,
            destination_port: 6379,
            source_pattern: "10.0.0.0/8".into(),
            ..Default::default()
        },
    }
}

/// A registration: instance `i` of `prefix`; the module type, version and
/// announced route rotate so the table has several types and versions.
/// `interval_seconds` is the heartbeat interval the instance promises.
pub fn registration(prefix: &str, i: usize, interval_seconds: i32) -> pb::RegisterModuleRequest {
    let (module_type, version, route_kind) = match i % 4 {
        0 | 1 => (ModuleType::Alb, "1.4.2", 0),
        2 => (ModuleType::Alb, "1.5.0", 1),
        _ => (ModuleType::Dblb, "2.0.0", 2),
    };
    let port = 20000 + (i % 40000) as u32;
    pb::RegisterModuleRequest {
        instance: Some(pb::ModuleInstance {
            instance_id: format!("{prefix}-{i}"),
            module_type: module_type as i32,
            address: format!("127.0.0.1:{port}"),
            health_status: HealthStatus::Healthy as i32,
            metadata: [
                ("data_address".to_string(), format!("127.0.0.2:{port}")),
                ("zone".to_string(), format!("zone-{}", i % 3)),
            ]
            .into(),
            max_connections: 10_000,
            version: version.into(),
            ..Default::default()
        }),
        initial_routes: vec![announced_route(route_kind)],
        health_config: Some(pb::HealthCheckConfig {
            interval_seconds,
            timeout_seconds: 1,
            unhealthy_threshold: 3,
            healthy_threshold: 1,
            ..Default::default()
        }),
        capabilities: [("protocols".to_string(), "http,https,websocket".to_string())].into(),
    }
}

/// A heartbeat with `current_stats` filled as a busy module would.
pub fn heartbeat(instance_id: &str, registration_id: &str, seq: u64) -> pb::HeartbeatRequest {
    let n = seq as i64;
    pb::HeartbeatRequest {
        instance_id: instance_id.to_string(),
        registration_id: registration_id.to_string(),
        status: HealthStatus::Healthy as i32,
        current_stats: Some(pb::ModuleStats {
            instance_id: instance_id.to_string(),
            total_requests: 1_000_000 + n * 250,
            successful_requests: 999_000 + n * 249,
            failed_requests: 1_000 + n,
            active_connections: 40 + (n % 20),
            total_connections: 50_000 + n * 10,
            avg_latency_ms: 3.2,
            p50_latency_ms: 2.1,
            p95_latency_ms: 9.8,
            p99_latency_ms: 21.5,
            bytes_received: 7_000_000 + n * 4096,
            bytes_sent: 90_000_000 + n * 65536,
            cpu_usage_percent: 35.0 + (n % 10) as f64,
            memory_usage_mb: 512.0,
            since: None,
            custom_stats: [
                ("requests_per_second".to_string(), "250".to_string()),
                ("queue_depth".to_string(), "3".to_string()),
            ]
            .into(),
        }),
        timestamp: None,
    }
}

/// The connections `RouteRequest` describes, in rotation; each is expected
/// to be routed (`routed = true`).
pub fn route_requests() -> Vec<pb::RouteRequestRequest> {
    let req = |protocol: Protocol, name: &str, port: i32, client: &str| pb::RouteRequestRequest {
        route: Some(pb::Route {
            protocol: protocol as i32,
            destination_pattern: name.into(),
            destination_port: port,
            source_pattern: client.into(),
            ..Default::default()
        }),
        context: Default::default(),
        dry_run: false,
    };
    vec![
        req(Protocol::Https, "www.example.com", 443, "203.0.113.7"),
        req(Protocol::Http, "api.example.com", 80, "198.51.100.20"),
        req(Protocol::Grpc, "", 50061, "10.2.3.4"),
        req(Protocol::Postgres, "", 5432, "10.9.8.7"),
        req(Protocol::Https, "shop.example.net", 443, "192.0.2.55"),
        req(Protocol::Websocket, "chat.example.net", 80, "192.0.2.56"),
        req(Protocol::Redis, "", 6379, "10.1.1.1"),
        req(Protocol::Tcp, "", 9091, "10.3.3.3"),
    ]
}
