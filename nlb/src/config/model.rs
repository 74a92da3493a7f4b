//! The config structure. Field names are the YAML keys; defaults are the
//! documented ones.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use shared_types::pb;

/// The NLB's whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NlbConfig {
    pub grpc: GrpcConfig,
    pub admin: AdminConfig,
    /// Where operator changes are persisted.
    pub state_file: PathBuf,
    pub registry: RegistryConfig,
    pub health: HealthConfig,
    pub routing: RoutingConfig,
    /// Static backend pools: name -> list of `host:port`.
    pub backends: BTreeMap<String, Vec<String>>,
    /// Operator routes.
    pub routes: Vec<RouteConfig>,
    /// Per module type (`alb`, ...): version -> percent, summing to 100.
    pub traffic_weights: BTreeMap<String, BTreeMap<String, u32>>,
    pub metrics: MetricsConfig,
    /// TLS for the gRPC and admin ports.
    pub tls: TlsSection,
    /// Token authentication of the control API.
    pub auth: AuthConfig,
    /// The data plane's listening ports.
    pub listeners: Vec<ListenerConfig>,
    /// How the data plane treats connections (limits, timeouts, logging).
    pub dataplane: DataplaneConfig,
    /// The NLB's autoscaler: per module type, how many instances to keep.
    pub autoscaling: AutoscalingConfig,
}

/// The autoscaler (see docs/operations.md, "Autoscaling").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutoscalingConfig {
    /// How often each module type is evaluated.
    pub evaluation_interval_seconds: u64,
    /// Module (`alb`, `echo`: the name an SDK module registers in
    /// `metadata["module"]`; for modules that send none, their module
    /// type) -> its policy. A module not listed is never scaled by the NLB.
    pub modules: BTreeMap<String, TypeScaling>,
}

impl Default for AutoscalingConfig {
    fn default() -> Self {
        AutoscalingConfig {
            evaluation_interval_seconds: 15,
            modules: BTreeMap::new(),
        }
    }
}

/// One module type's autoscaling policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TypeScaling {
    pub enabled: bool,
    pub min_instances: u32,
    pub max_instances: u32,
    /// Active connections per instance to aim at (0 = not used).
    pub target_connections: u32,
    /// Average CPU percent to aim at (0 = not used).
    pub target_cpu_percent: u32,
    /// No change while every used metric is within this share of its
    /// target.
    pub tolerance: f64,
    /// After any change, no scale-up for this long.
    pub scale_up_cooldown_seconds: u64,
    /// After any change, no scale-down for this long.
    pub scale_down_cooldown_seconds: u64,
    /// A scale-down goes to the highest count recommended over this long
    /// (so a dip does not remove instances a peak needs).
    pub window_seconds: u64,
}

impl Default for TypeScaling {
    fn default() -> Self {
        TypeScaling {
            enabled: true,
            min_instances: 1,
            max_instances: 10,
            target_connections: 0,
            target_cpu_percent: 0,
            tolerance: 0.1,
            scale_up_cooldown_seconds: 60,
            scale_down_cooldown_seconds: 300,
            window_seconds: 300,
        }
    }
}

impl Default for NlbConfig {
    fn default() -> Self {
        NlbConfig {
            grpc: GrpcConfig::default(),
            admin: AdminConfig::default(),
            state_file: PathBuf::from("nlb.state.json"),
            registry: RegistryConfig::default(),
            health: HealthConfig::default(),
            routing: RoutingConfig::default(),
            backends: BTreeMap::new(),
            routes: Vec::new(),
            traffic_weights: BTreeMap::new(),
            metrics: MetricsConfig::default(),
            tls: TlsSection::default(),
            auth: AuthConfig::default(),
            listeners: Vec::new(),
            dataplane: DataplaneConfig::default(),
            autoscaling: AutoscalingConfig::default(),
        }
    }
}

/// One data-plane listener.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerConfig {
    /// Unique; letters, digits, `-`, `_`, `.` (it labels metrics).
    pub name: String,
    /// `ip:port` (`0.0.0.0:443`, `[::]:443`).
    pub bind: String,
    /// `auto` sniffs the protocol from the first bytes; a protocol name
    /// (`tcp`, `http`, `https`, `postgres`, `mysql`, ...) declares it and
    /// nothing is read before routing.
    pub protocol: String,
    /// Connections open at once on this listener; 0 = no limit of its own.
    pub max_connections: u32,
    /// Every connection starts with a PROXY v2 header from a load balancer
    /// in front; its source is the client.
    pub proxy_protocol: bool,
    /// With `proxy_protocol`: the peers (CIDRs) allowed to send the header;
    /// empty = any peer.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<String>,
}

/// How the data plane treats connections (numbers and switches only, so
/// a connection copies it).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataplaneConfig {
    /// Connections open at once over all listeners.
    pub max_connections: u32,
    /// Connections still being sniffed at once (a slowloris cap); more are
    /// closed at accept.
    pub max_sniffing: u32,
    /// Bytes read at most to find a protocol.
    pub sniff_budget_bytes: u32,
    /// Time the first bytes may take to tell the protocol.
    pub sniff_timeout_ms: u64,
    /// Time a PROXY v2 header may take (listeners with `proxy_protocol`).
    pub proxy_header_timeout_ms: u64,
    /// Time to connect to one instance.
    pub connect_timeout_ms: u64,
    /// Instances tried per connection before giving up.
    pub connect_attempts: u32,
    /// Consecutive connect failures that eject an instance (until it
    /// heartbeats healthy again; a static backend for `eject_seconds`).
    pub eject_after_failures: u32,
    pub eject_seconds: u64,
    /// A connection with no byte either way for this long is closed.
    pub idle_timeout_seconds: u64,
    /// TCP keepalive on both legs (seconds of idle before probes); 0 = off.
    pub tcp_keepalive_seconds: u64,
    /// Bytes read at once per direction; a buffer is taken only while data
    /// moves.
    pub buffer_bytes: u32,
    /// New connections per second from one source address; 0 = no limit.
    pub source_rate_per_second: u32,
    /// Burst above that rate.
    pub source_burst: u32,
    /// How long connections may finish after SIGTERM or after their
    /// listener is removed.
    pub drain_timeout_seconds: u64,
    /// One log line per connection (target `access`).
    pub access_log: bool,
    /// Data threads, each with its own single-threaded runtime accepting
    /// on every listener; 0 = one per CPU core. Read once, at the first
    /// listener's start.
    pub threads: u32,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        DataplaneConfig {
            max_connections: 100_000,
            max_sniffing: 10_000,
            sniff_budget_bytes: shared_types::sniff::DEFAULT_BUDGET as u32,
            sniff_timeout_ms: shared_types::sniff::DEFAULT_TIMEOUT.as_millis() as u64,
            proxy_header_timeout_ms: 3_000,
            connect_timeout_ms: 2_000,
            connect_attempts: 3,
            eject_after_failures: 3,
            eject_seconds: 10,
            idle_timeout_seconds: 300,
            tcp_keepalive_seconds: 60,
            buffer_bytes: 16_384,
            source_rate_per_second: 0,
            source_burst: 0,
            drain_timeout_seconds: 30,
            access_log: false,
            threads: 0,
        }
    }
}

/// The control API's gRPC server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcConfig {
    pub listen: String,
    /// Largest request or response message, in bytes.
    pub max_message_bytes: usize,
    /// HTTP/2 keepalive ping interval (0 = off).
    pub keepalive_interval_seconds: u64,
    /// How long a keepalive ping may go unanswered before the connection closes.
    pub keepalive_timeout_seconds: u64,
    /// A new connection must send the HTTP/2 preface within this time.
    pub handshake_timeout_seconds: u64,
    /// Concurrent streams per client connection.
    pub max_concurrent_streams: u32,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig {
            listen: "127.0.0.1:50051".into(),
            max_message_bytes: 4 * 1024 * 1024,
            keepalive_interval_seconds: 30,
            keepalive_timeout_seconds: 10,
            handshake_timeout_seconds: 10,
            max_concurrent_streams: 256,
        }
    }
}

/// The admin HTTP server (`/healthz`, `/readyz`, `/metrics`, `/status`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9090".into(),
        }
    }
}

/// Registrations and their lifetime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Drain deadline for a graceful unregister that names none.
    pub drain_timeout_seconds: u32,
    /// How long an instance that stopped heartbeating stays listed (as
    /// unhealthy, taking no traffic) before it is removed.
    pub removal_grace_seconds: u32,
    /// Most instances the registry holds.
    pub max_instances: usize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            drain_timeout_seconds: 30,
            removal_grace_seconds: 30,
            max_instances: 100_000,
        }
    }
}

/// Active health checks (`ModuleService.HealthCheck`) beside heartbeat leases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Call each instance's `HealthCheck` every `interval_seconds`.
    pub active_checks: bool,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            active_checks: true,
        }
    }
}

/// Routing choices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// Choose version and instance by a hash of the client address.
    pub sticky: bool,
    /// Deadline for each `CanHandle` call made by `ValidateRoute`.
    pub validate_timeout_ms: u64,
    /// Deadline for each module call made by `CheckHealth`, `TriggerScaling`.
    pub module_call_timeout_ms: u64,
    /// A newly registered instance's capacity ramps from 10% to full over
    /// this long, so it is not stampeded (0 = no ramp).
    pub slow_start_seconds: u64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            sticky: false,
            validate_timeout_ms: 500,
            module_call_timeout_ms: 2000,
            slow_start_seconds: 30,
        }
    }
}

/// The metrics store behind `ReportMetrics` and `Get*Metrics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Points kept per series (oldest dropped first).
    pub retention_points: usize,
    /// Series (name + labels) kept per instance; more are refused.
    pub max_series_per_instance: usize,
    /// How often the NLB samples its own metrics into its series.
    pub sample_interval_seconds: u64,
    /// `StreamNLBMetrics` interval when the request gives 0.
    pub stream_default_interval_seconds: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            retention_points: 360,
            max_series_per_instance: 256,
            sample_interval_seconds: 10,
            stream_default_interval_seconds: 5,
        }
    }
}

/// An operator route in YAML: the contract's `Route` with protocol as a name.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteConfig {
    pub route_id: String,
    pub protocol: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub source_pattern: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub destination_pattern: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub destination_port: i64,
    #[serde(skip_serializing_if = "is_zero_i32")]
    pub priority: i32,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub path_pattern: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}
fn is_zero_i32(n: &i32) -> bool {
    *n == 0
}

impl RouteConfig {
    /// The contract form. A protocol name that does not parse becomes
    /// `UNSPECIFIED`, which route validation refuses.
    pub fn to_proto(&self) -> pb::Route {
        pb::Route {
            route_id: self.route_id.clone(),
            protocol: pb::Protocol::parse_name(&self.protocol)
                .map_or(pb::Protocol::Unspecified as i32, |p| p as i32),
            source_pattern: self.source_pattern.clone(),
            destination_pattern: self.destination_pattern.clone(),
            source_port: 0,
            destination_port: i32::try_from(self.destination_port).unwrap_or(-1),
            headers: self.headers.clone().into_iter().collect(),
            path_pattern: self.path_pattern.clone(),
            priority: self.priority,
            metadata: self.metadata.clone().into_iter().collect(),
        }
    }

    /// From the contract form.
    pub fn from_proto(route: &pb::Route) -> Self {
        RouteConfig {
            route_id: route.route_id.clone(),
            protocol: pb::Protocol::from_wire(route.protocol).map_or_else(
                || route.protocol.to_string(),
                |p| p.short_name().to_string(),
            ),
            source_pattern: route.source_pattern.clone(),
            destination_pattern: route.destination_pattern.clone(),
            destination_port: i64::from(route.destination_port),
            priority: route.priority,
            path_pattern: route.path_pattern.clone(),
            headers: route.headers.clone().into_iter().collect(),
            metadata: route.metadata.clone().into_iter().collect(),
        }
    }
}

/// TLS for the control API's gRPC port and the admin port. A port without
/// its entry is plaintext. Certificate, key and CA files are re-read when
/// they change on disk and on SIGHUP; turning TLS on or off for a port takes
/// a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc: Option<TlsFiles>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<TlsFiles>,
    /// How often the files are checked for changes (0 = only on SIGHUP).
    pub reload_interval_seconds: u64,
}

impl Default for TlsSection {
    fn default() -> Self {
        TlsSection {
            grpc: None,
            admin: None,
            reload_interval_seconds: 10,
        }
    }
}

/// One port's certificate chain, private key and, for mutual TLS, the CA
/// that client certificates must chain to. PEM files.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Set: mutual TLS, clients must present a certificate signed by this CA.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
}

/// Where the control API's tokens come from. Tokens themselves never appear
/// in the config: they live in `tokens_file` (re-read when it changes) or in
/// the `NLB_OPERATOR_TOKEN`, `NLB_VIEWER_TOKEN` and `NLB_MODULE_TOKEN`
/// environment variables. With no tokens at all, the API is open.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_file: Option<PathBuf>,
    /// How often the tokens file is checked for changes (0 = only on SIGHUP).
    pub reload_interval_seconds: u64,
    /// A file holding the token the NLB presents when it calls a module's
    /// ModuleService (`NLB_MODULE_CALL_TOKEN` wins over it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module_call_token_file: Option<PathBuf>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            tokens_file: None,
            reload_interval_seconds: 10,
            module_call_token_file: None,
        }
    }
}
