//! A module's config: the SDK's sections (where the NLB is, where to listen,
//! timings, tokens) plus the module's own `module:` section, from a YAML
//! file and the `MODULE_*` environment variables every module reads.
//!
//! With no file every key has a documented default (`docs/modules.md`), so
//! `echo-module` with no flags is a working module. Environment variables
//! win over the file. Tokens never appear in the file itself: the file names
//! token *files*, the environment may hold the tokens.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value;

/// One problem with a config, naming the key (`listen.grpc`) or variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Empty when the problem is the file as a whole (unreadable, not YAML).
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The whole config of a module process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SdkConfig {
    /// The NLB's control API.
    pub nlb: NlbLink,
    /// Where the module listens.
    pub listen: Listen,
    /// The host (name or IP) the NLB and operators use to reach this module;
    /// empty: the listen IP when it is a specific one, else the host name.
    pub advertise_host: String,
    /// This instance's id; empty: `<module>-<host name>-<data port>`.
    pub instance_id: String,
    /// The version this instance runs; empty: the module's own version.
    pub version: String,
    /// Most data connections at once (0 = unlimited); announced to the NLB.
    pub max_connections: u32,
    pub heartbeat: HeartbeatConfig,
    pub registration: RegistrationConfig,
    pub metrics: MetricsConfig,
    pub shutdown: ShutdownConfig,
    pub data: DataConfig,
    pub auth: AuthConfig,
    pub scaling: ScalingSettings,
    /// The module's own section, handed to it as YAML.
    pub module: Value,
}

impl Default for SdkConfig {
    fn default() -> Self {
        SdkConfig {
            nlb: NlbLink::default(),
            listen: Listen::default(),
            advertise_host: String::new(),
            instance_id: String::new(),
            version: String::new(),
            max_connections: 0,
            heartbeat: HeartbeatConfig::default(),
            registration: RegistrationConfig::default(),
            metrics: MetricsConfig::default(),
            shutdown: ShutdownConfig::default(),
            data: DataConfig::default(),
            auth: AuthConfig::default(),
            scaling: ScalingSettings::default(),
            module: Value::Null,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NlbLink {
    /// `host:port` of the NLB's gRPC control API.
    pub addr: String,
    /// A file holding the module token this module presents to the NLB
    /// (`MODULE_TOKEN` wins over it).
    pub token_file: Option<PathBuf>,
    pub tls: ClientTls,
}

impl Default for NlbLink {
    fn default() -> Self {
        NlbLink {
            addr: "127.0.0.1:50051".into(),
            token_file: None,
            tls: ClientTls::default(),
        }
    }
}

/// TLS to the NLB's control API: on when `ca_file` is set; `cert_file` and
/// `key_file` add a client certificate (mutual TLS).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClientTls {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The name to verify in the NLB's certificate; empty: the host of `addr`.
    pub server_name: String,
}

impl ClientTls {
    pub fn enabled(&self) -> bool {
        self.ca_file.is_some()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// ModuleService (gRPC).
    pub grpc: String,
    /// The data listener the NLB forwards connections to.
    pub data: String,
    /// `/healthz`, `/readyz`, `/metrics`, `/status`.
    pub admin: String,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            grpc: "0.0.0.0:50061".into(),
            data: "0.0.0.0:8080".into(),
            admin: "0.0.0.0:9101".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HeartbeatConfig {
    /// Seconds between beats, promised to the NLB at registration.
    pub interval_seconds: u32,
    /// How long the NLB's active health check may wait for this module.
    pub timeout_seconds: u32,
    /// Missed beats before the NLB stops sending new connections.
    pub unhealthy_threshold: u32,
    /// Good beats before it sends them again.
    pub healthy_threshold: u32,
    /// Beat over one `HeartbeatStream` (falls back to unary `Heartbeat`
    /// against an NLB without the extension).
    pub stream: bool,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            interval_seconds: 2,
            timeout_seconds: 1,
            unhealthy_threshold: 3,
            healthy_threshold: 1,
            stream: true,
        }
    }
}

impl HeartbeatConfig {
    pub fn interval(&self) -> Duration {
        Duration::from_secs(u64::from(self.interval_seconds.max(1)))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrationConfig {
    /// First retry delay; doubles per failed attempt, with full jitter.
    pub initial_backoff_ms: u64,
    /// Longest delay between attempts.
    pub max_backoff_ms: u64,
    /// Deadline of one RegisterModule call.
    pub call_timeout_seconds: u64,
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        RegistrationConfig {
            initial_backoff_ms: 200,
            max_backoff_ms: 10_000,
            call_timeout_seconds: 5,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Seconds between `ReportMetrics` calls (0 = never).
    pub report_interval_seconds: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            report_interval_seconds: 10,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// After SIGTERM (or a `Shutdown` call without a timeout), how long open
    /// connections may finish before they are closed.
    pub drain_timeout_seconds: u64,
    /// A shed connection asked to finish is closed after this long.
    pub shed_grace_seconds: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_timeout_seconds: 30,
            shed_grace_seconds: 5,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Ask the NLB for a PROXY v2 header on every connection (the real
    /// client address); a connection without one is then refused.
    pub proxy_protocol: bool,
    /// How long a connection may take to send its PROXY v2 header.
    pub proxy_header_timeout_ms: u64,
    /// Data threads, each with its own single-threaded runtime serving the
    /// connections it accepts; 0 = one per CPU core.
    pub threads: u32,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            proxy_protocol: false,
            proxy_header_timeout_ms: 5_000,
            threads: 0,
        }
    }
}

/// Who may change this module over ModuleService: operators and the NLB.
/// Tokens come from `tokens_file` and `MODULE_OPERATOR_TOKEN` /
/// `MODULE_NLB_TOKEN`; with none, the module runs open (and says so).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub tokens_file: Option<PathBuf>,
}

/// What carries out `Scale` (`crate::scale`): `none`, `docker` or
/// `kubernetes`. A scaler the module's `main` gives the `Runner` wins.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ScalingSettings {
    pub backend: String,
    pub docker: DockerScaling,
    pub kubernetes: KubernetesScaling,
}

impl Default for ScalingSettings {
    fn default() -> Self {
        ScalingSettings {
            backend: "none".into(),
            docker: DockerScaling::default(),
            kubernetes: KubernetesScaling::default(),
        }
    }
}

/// The scaling backends.
pub const SCALING_BACKENDS: &[&str] = &["none", "docker", "kubernetes"];

/// The Docker backend: containers of this module's compose service, made
/// through the Docker Engine API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DockerScaling {
    /// The Engine API's unix socket, or `tcp://host:port` (plain HTTP: a
    /// socket proxy on a private network).
    pub socket: PathBuf,
    /// The compose project; empty: this container's
    /// `com.docker.compose.project` label.
    pub project: String,
    /// The compose service; empty: this container's
    /// `com.docker.compose.service` label.
    pub service: String,
    /// How long a container stopped by a scale-down may drain before Docker
    /// kills it (match `shutdown.drain_timeout_seconds`).
    pub stop_timeout_seconds: u64,
}

impl Default for DockerScaling {
    fn default() -> Self {
        DockerScaling {
            socket: PathBuf::from("/var/run/docker.sock"),
            project: String::new(),
            service: String::new(),
            stop_timeout_seconds: 30,
        }
    }
}

/// Where a pod finds its service account.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The Kubernetes backend: the replicas of the module's Deployment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesScaling {
    /// `https://host:port` (or `http://` behind a local proxy); empty:
    /// `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`.
    pub api: String,
    /// Empty: the pod's own namespace (the service account's `namespace`).
    pub namespace: String,
    /// The Deployment that runs this module (required).
    pub deployment: String,
    /// The bearer token, read again at each call (tokens rotate).
    pub token_file: PathBuf,
    /// The CA the API server's certificate is checked against.
    pub ca_file: PathBuf,
}

impl Default for KubernetesScaling {
    fn default() -> Self {
        let sa = Path::new(SERVICE_ACCOUNT_DIR);
        KubernetesScaling {
            api: String::new(),
            namespace: String::new(),
            deployment: String::new(),
            token_file: sa.join("token"),
            ca_file: sa.join("ca.crt"),
        }
    }
}

/// Every `MODULE_*` variable the SDK reads, with the key it overrides.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("MODULE_NLB_ADDR", "nlb.addr"),
    ("MODULE_GRPC_LISTEN", "listen.grpc"),
    ("MODULE_DATA_LISTEN", "listen.data"),
    ("MODULE_ADMIN_LISTEN", "listen.admin"),
    ("MODULE_ADVERTISE_HOST", "advertise_host"),
    ("MODULE_INSTANCE_ID", "instance_id"),
    ("MODULE_VERSION", "version"),
    ("MODULE_TOKEN_FILE", "nlb.token_file"),
    ("MODULE_NLB_TLS_CA", "nlb.tls.ca_file"),
    ("MODULE_NLB_TLS_CERT", "nlb.tls.cert_file"),
    ("MODULE_NLB_TLS_KEY", "nlb.tls.key_file"),
    ("MODULE_NLB_TLS_SERVER_NAME", "nlb.tls.server_name"),
    ("MODULE_TOKENS_FILE", "auth.tokens_file"),
    ("MODULE_SCALING_BACKEND", "scaling.backend"),
    ("MODULE_SCALING_DOCKER_SOCKET", "scaling.docker.socket"),
    ("MODULE_SCALING_DOCKER_PROJECT", "scaling.docker.project"),
    ("MODULE_SCALING_DOCKER_SERVICE", "scaling.docker.service"),
    (
        "MODULE_SCALING_DOCKER_STOP_TIMEOUT",
        "scaling.docker.stop_timeout_seconds",
    ),
    ("MODULE_SCALING_KUBERNETES_API", "scaling.kubernetes.api"),
    (
        "MODULE_SCALING_KUBERNETES_NAMESPACE",
        "scaling.kubernetes.namespace",
    ),
    (
        "MODULE_SCALING_KUBERNETES_DEPLOYMENT",
        "scaling.kubernetes.deployment",
    ),
    (
        "MODULE_SCALING_KUBERNETES_TOKEN_FILE",
        "scaling.kubernetes.token_file",
    ),
    (
        "MODULE_SCALING_KUBERNETES_CA_FILE",
        "scaling.kubernetes.ca_file",
    ),
];

/// The token this module presents to the NLB (wins over `nlb.token_file`).
pub const ENV_TOKEN: &str = "MODULE_TOKEN";

impl SdkConfig {
    /// Reads the file (if any), applies the environment (`env` looks a
    /// variable up) and validates. Every problem is reported, not only the
    /// first.
    pub fn load(
        path: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<SdkConfig, Vec<ConfigError>> {
        let mut config = match path {
            None => SdkConfig::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    vec![ConfigError::new(
                        "",
                        format!("cannot read {}: {e}", p.display()),
                    )]
                })?;
                Self::parse(&text)?
            }
        };
        let mut errors = config.apply_env(env);
        if let Err(more) = config.validate() {
            errors.extend(more);
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(errors)
        }
    }

    /// Parses YAML text (an empty file is all defaults).
    pub fn parse(text: &str) -> Result<SdkConfig, Vec<ConfigError>> {
        if text.trim().is_empty() {
            return Ok(SdkConfig::default());
        }
        serde_yaml_ng::from_str(text).map_err(|e| {
            let at = e
                .location()
                .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
                .unwrap_or_default();
            vec![ConfigError::new("", format!("{e}{at}"))]
        })
    }

    /// Applies the `MODULE_*` overrides; a value that does not parse is a
    /// problem naming the variable.
    fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        for (var, key) in ENV_OVERRIDES {
            let Some(v) = env(var) else { continue };
            let path = || Some(PathBuf::from(&v)).filter(|p| !p.as_os_str().is_empty());
            match *key {
                "nlb.addr" => self.nlb.addr = v.clone(),
                "listen.grpc" => self.listen.grpc = v.clone(),
                "listen.data" => self.listen.data = v.clone(),
                "listen.admin" => self.listen.admin = v.clone(),
                "advertise_host" => self.advertise_host = v.clone(),
                "instance_id" => self.instance_id = v.clone(),
                "version" => self.version = v.clone(),
                "nlb.token_file" => self.nlb.token_file = path(),
                "nlb.tls.ca_file" => self.nlb.tls.ca_file = path(),
                "nlb.tls.cert_file" => self.nlb.tls.cert_file = path(),
                "nlb.tls.key_file" => self.nlb.tls.key_file = path(),
                "nlb.tls.server_name" => self.nlb.tls.server_name = v.clone(),
                "auth.tokens_file" => self.auth.tokens_file = path(),
                "scaling.backend" => self.scaling.backend = v.clone(),
                "scaling.docker.socket" => self.scaling.docker.socket = PathBuf::from(&v),
                "scaling.docker.project" => self.scaling.docker.project = v.clone(),
                "scaling.docker.service" => self.scaling.docker.service = v.clone(),
                "scaling.docker.stop_timeout_seconds" => match v.trim().parse() {
                    Ok(n) => self.scaling.docker.stop_timeout_seconds = n,
                    Err(_) => errors.push(ConfigError::new(
                        *var,
                        format!("{v:?} is not a number of seconds ({key})"),
                    )),
                },
                "scaling.kubernetes.api" => self.scaling.kubernetes.api = v.clone(),
                "scaling.kubernetes.namespace" => self.scaling.kubernetes.namespace = v.clone(),
                "scaling.kubernetes.deployment" => self.scaling.kubernetes.deployment = v.clone(),
                "scaling.kubernetes.token_file" => {
                    self.scaling.kubernetes.token_file = PathBuf::from(&v)
                }
                "scaling.kubernetes.ca_file" => self.scaling.kubernetes.ca_file = PathBuf::from(&v),
                other => unreachable!("ENV_OVERRIDES names {other} without a setter"),
            }
        }
        errors
    }

    /// Checks every key; returns all problems.
    pub fn validate(&self) -> Result<(), Vec<ConfigError>> {
        let mut errors = Vec::new();
        let mut err = |k: &str, m: String| errors.push(ConfigError::new(k, m));
        if split_host_port(&self.nlb.addr).is_none() {
            err(
                "nlb.addr",
                format!("{:?} is not host:port (e.g. nlb:50051)", self.nlb.addr),
            );
        }
        for (key, addr) in [
            ("listen.grpc", &self.listen.grpc),
            ("listen.data", &self.listen.data),
            ("listen.admin", &self.listen.admin),
        ] {
            if addr.parse::<SocketAddr>().is_err() {
                err(
                    key,
                    format!("{addr:?} is not ip:port (e.g. 0.0.0.0:8080 or [::]:8080)"),
                );
            }
        }
        let ports: Vec<_> = [&self.listen.grpc, &self.listen.data, &self.listen.admin]
            .iter()
            .filter_map(|a| a.parse::<SocketAddr>().ok())
            .filter(|a| a.port() != 0)
            .collect();
        for (i, a) in ports.iter().enumerate() {
            if ports[..i].contains(a) {
                err("listen", format!("{a} is used by two listeners"));
            }
        }
        if !self.instance_id.is_empty() && !valid_id(&self.instance_id) {
            err(
                "instance_id",
                format!(
                    "{:?}: use 1-128 letters, digits, '-', '_', '.' or ':'",
                    self.instance_id
                ),
            );
        }
        if !self.version.is_empty() && !valid_id(&self.version) {
            err(
                "version",
                format!(
                    "{:?}: use 1-128 letters, digits, '-', '_', '.' or ':'",
                    self.version
                ),
            );
        }
        if self.advertise_host.chars().any(char::is_whitespace) {
            err(
                "advertise_host",
                format!("{:?} contains whitespace", self.advertise_host),
            );
        }
        if self.heartbeat.interval_seconds == 0 {
            err(
                "heartbeat.interval_seconds",
                "must be at least 1".to_string(),
            );
        }
        if self.heartbeat.timeout_seconds == 0 {
            err(
                "heartbeat.timeout_seconds",
                "must be at least 1".to_string(),
            );
        }
        if self.registration.initial_backoff_ms == 0
            || self.registration.max_backoff_ms < self.registration.initial_backoff_ms
        {
            err(
                "registration",
                format!(
                    "initial_backoff_ms ({}) must be at least 1 and at most max_backoff_ms ({})",
                    self.registration.initial_backoff_ms, self.registration.max_backoff_ms
                ),
            );
        }
        if self.registration.call_timeout_seconds == 0 {
            err(
                "registration.call_timeout_seconds",
                "must be at least 1".to_string(),
            );
        }
        if self.shutdown.drain_timeout_seconds > 86_400 {
            err(
                "shutdown.drain_timeout_seconds",
                format!(
                    "{} is more than a day (86400), the longest drain the NLB accepts",
                    self.shutdown.drain_timeout_seconds
                ),
            );
        }
        if self.shutdown.shed_grace_seconds > 3_600 {
            err(
                "shutdown.shed_grace_seconds",
                format!(
                    "{} is more than an hour (3600)",
                    self.shutdown.shed_grace_seconds
                ),
            );
        }
        if self.data.threads > 1024 {
            err(
                "data.threads",
                format!("{} is more than 1024", self.data.threads),
            );
        }
        if self.data.proxy_header_timeout_ms == 0 {
            err(
                "data.proxy_header_timeout_ms",
                "must be at least 1".to_string(),
            );
        }
        let tls = &self.nlb.tls;
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            err(
                "nlb.tls",
                "cert_file and key_file go together (a client certificate needs its key)"
                    .to_string(),
            );
        }
        if tls.cert_file.is_some() && tls.ca_file.is_none() {
            err(
                "nlb.tls.ca_file",
                "a client certificate needs TLS: set ca_file (the CA that signed the NLB's certificate)"
                    .to_string(),
            );
        }
        self.scaling.validate(&mut err);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// The address a listener is reached at: `advertise_host` when set, else
    /// the listen IP when it is a specific one, else `outward` (this host's
    /// address toward the NLB, see [`outward_host`]).
    pub fn advertised(&self, listen: SocketAddr, outward: &str) -> String {
        let host = if !self.advertise_host.is_empty() {
            self.advertise_host.as_str()
        } else if !listen.ip().is_unspecified() {
            return listen.to_string();
        } else {
            outward
        };
        join_host_port(host, listen.port())
    }
}

impl ScalingSettings {
    /// Checks the section; the backend's own keys only when it is chosen.
    fn validate(&self, err: &mut dyn FnMut(&str, String)) {
        if !SCALING_BACKENDS.contains(&self.backend.as_str()) {
            err(
                "scaling.backend",
                format!(
                    "{:?} is not a backend: use none, docker or kubernetes",
                    self.backend
                ),
            );
        }
        if self.backend == "docker" {
            let d = &self.docker;
            let socket = d.socket.to_string_lossy();
            if socket.is_empty() {
                err(
                    "scaling.docker.socket",
                    "is empty: give the Docker Engine API's socket (/var/run/docker.sock)".into(),
                );
            } else if let Some(rest) = socket.strip_prefix("tcp://") {
                if crate::scale::http::parse_url(&format!("http://{rest}")).is_err() {
                    err(
                        "scaling.docker.socket",
                        format!("{socket:?} is not tcp://host:port"),
                    );
                }
            } else if !d.socket.is_absolute() {
                err(
                    "scaling.docker.socket",
                    format!("{socket:?} is not an absolute path or tcp://host:port"),
                );
            }
            for (key, v) in [
                ("scaling.docker.project", &d.project),
                ("scaling.docker.service", &d.service),
            ] {
                if v.chars().any(|c| c.is_whitespace() || c == '=' || c == '/') {
                    err(key, format!("{v:?} is not a compose name"));
                }
            }
            if d.stop_timeout_seconds > 86_400 {
                err(
                    "scaling.docker.stop_timeout_seconds",
                    format!("{} is more than a day (86400)", d.stop_timeout_seconds),
                );
            }
        }
        if self.backend == "kubernetes" {
            let k = &self.kubernetes;
            if k.deployment.is_empty() {
                err(
                    "scaling.kubernetes.deployment",
                    "is required: the name of the Deployment that runs this module".into(),
                );
            } else if !dns_label(&k.deployment, 253) {
                err(
                    "scaling.kubernetes.deployment",
                    format!("{:?} is not a Kubernetes object name", k.deployment),
                );
            }
            if !k.namespace.is_empty() && !dns_label(&k.namespace, 63) {
                err(
                    "scaling.kubernetes.namespace",
                    format!("{:?} is not a Kubernetes namespace name", k.namespace),
                );
            }
            if !k.api.is_empty() && crate::scale::http::parse_url(&k.api).is_err() {
                err(
                    "scaling.kubernetes.api",
                    format!("{:?} is not https://host:port (or http://host:port)", k.api),
                );
            }
            for (key, p) in [
                ("scaling.kubernetes.token_file", &k.token_file),
                ("scaling.kubernetes.ca_file", &k.ca_file),
            ] {
                if p.as_os_str().is_empty() {
                    err(key, "is empty".into());
                }
            }
        }
    }
}

/// A DNS-1123 name: lowercase letters, digits, `-` and `.`, starting and
/// ending with a letter or digit.
fn dns_label(s: &str, max: usize) -> bool {
    (1..=max).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// This host as others reach it, for a module listening on every address:
/// the local IP of the route toward the NLB (a container's or pod's own
/// address, `127.0.0.1` next to a local NLB), else of the default route,
/// else the host name. Only a routing lookup: no packet is sent.
pub async fn outward_host(nlb_addr: &str) -> String {
    let nlb = match tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host(nlb_addr))
        .await
    {
        Ok(Ok(mut addrs)) => addrs.next(),
        _ => None,
    };
    // 192.0.2.1 (TEST-NET-1) stands for "anywhere": it picks the default
    // route's source address.
    let toward = nlb.unwrap_or_else(|| SocketAddr::from(([192, 0, 2, 1], 9)));
    source_ip(toward)
        .or_else(|| source_ip(SocketAddr::from(([192, 0, 2, 1], 9))))
        .map(|ip| ip.to_string())
        .unwrap_or_else(host_name)
}

/// The local address the kernel would send from to reach `to`.
fn source_ip(to: SocketAddr) -> Option<IpAddr> {
    let bind = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let socket = UdpSocket::bind(bind).ok()?;
    socket.connect(to).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// `host:port` with brackets around an IPv6 literal.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Splits `host:port` (`[v6]:port` too); `None` if it is not one.
pub fn split_host_port(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(char::is_whitespace) {
        return None;
    }
    Some((host, port))
}

/// The machine's host name (a container's is its id), `localhost` if unknown.
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn valid_id(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
}

/// Reads a secret from a file: trimmed, never empty.
pub fn read_secret(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let secret = text.trim().to_string();
    if secret.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn no_file_is_the_documented_defaults() {
        let c = SdkConfig::load(None, &env_of(&[])).unwrap();
        assert_eq!(c, SdkConfig::default());
        assert_eq!(c.nlb.addr, "127.0.0.1:50051");
        assert_eq!(c.listen.grpc, "0.0.0.0:50061");
        assert_eq!(c.listen.data, "0.0.0.0:8080");
        assert_eq!(c.listen.admin, "0.0.0.0:9101");
        assert_eq!(c.heartbeat.interval_seconds, 2);
        assert!(c.heartbeat.stream);
        assert_eq!(c.shutdown.drain_timeout_seconds, 30);
    }

    #[test]
    fn every_documented_variable_overrides_its_key() {
        let env = env_of(&[
            ("MODULE_NLB_ADDR", "nlb:7000"),
            ("MODULE_GRPC_LISTEN", "127.0.0.1:1"),
            ("MODULE_DATA_LISTEN", "127.0.0.1:2"),
            ("MODULE_ADMIN_LISTEN", "127.0.0.1:3"),
            ("MODULE_ADVERTISE_HOST", "alb-1.internal"),
            ("MODULE_INSTANCE_ID", "alb-1"),
            ("MODULE_VERSION", "2.0.0"),
            ("MODULE_TOKEN_FILE", "/run/token"),
            ("MODULE_NLB_TLS_CA", "/tls/ca.pem"),
            ("MODULE_NLB_TLS_CERT", "/tls/c.pem"),
            ("MODULE_NLB_TLS_KEY", "/tls/k.pem"),
            ("MODULE_NLB_TLS_SERVER_NAME", "nlb.internal"),
            ("MODULE_TOKENS_FILE", "/run/tokens.yaml"),
            ("MODULE_SCALING_BACKEND", "kubernetes"),
            ("MODULE_SCALING_DOCKER_SOCKET", "/run/docker.sock"),
            ("MODULE_SCALING_DOCKER_PROJECT", "edge"),
            ("MODULE_SCALING_DOCKER_SERVICE", "alb"),
            ("MODULE_SCALING_DOCKER_STOP_TIMEOUT", "45"),
            ("MODULE_SCALING_KUBERNETES_API", "https://10.0.0.1:6443"),
            ("MODULE_SCALING_KUBERNETES_NAMESPACE", "edge"),
            ("MODULE_SCALING_KUBERNETES_DEPLOYMENT", "alb"),
            ("MODULE_SCALING_KUBERNETES_TOKEN_FILE", "/sa/token"),
            ("MODULE_SCALING_KUBERNETES_CA_FILE", "/sa/ca.crt"),
        ]);
        let file = "nlb: {addr: 'other:1'}\ninstance_id: from-file\n";
        let mut c = SdkConfig::parse(file).unwrap();
        assert!(c.apply_env(&env).is_empty());
        c.validate().unwrap();
        assert_eq!(c.nlb.addr, "nlb:7000");
        assert_eq!(c.listen.grpc, "127.0.0.1:1");
        assert_eq!(c.listen.data, "127.0.0.1:2");
        assert_eq!(c.listen.admin, "127.0.0.1:3");
        assert_eq!(c.advertise_host, "alb-1.internal");
        assert_eq!(c.instance_id, "alb-1");
        assert_eq!(c.version, "2.0.0");
        assert_eq!(c.nlb.token_file.as_deref(), Some(Path::new("/run/token")));
        assert_eq!(c.nlb.tls.ca_file.as_deref(), Some(Path::new("/tls/ca.pem")));
        assert_eq!(
            c.nlb.tls.cert_file.as_deref(),
            Some(Path::new("/tls/c.pem"))
        );
        assert_eq!(c.nlb.tls.key_file.as_deref(), Some(Path::new("/tls/k.pem")));
        assert_eq!(c.nlb.tls.server_name, "nlb.internal");
        assert_eq!(
            c.auth.tokens_file.as_deref(),
            Some(Path::new("/run/tokens.yaml"))
        );
        let s = &c.scaling;
        assert_eq!(s.backend, "kubernetes");
        assert_eq!(s.docker.socket, Path::new("/run/docker.sock"));
        assert_eq!(
            (s.docker.project.as_str(), s.docker.service.as_str()),
            ("edge", "alb")
        );
        assert_eq!(s.docker.stop_timeout_seconds, 45);
        assert_eq!(s.kubernetes.api, "https://10.0.0.1:6443");
        assert_eq!(s.kubernetes.namespace, "edge");
        assert_eq!(s.kubernetes.deployment, "alb");
        assert_eq!(s.kubernetes.token_file, Path::new("/sa/token"));
        assert_eq!(s.kubernetes.ca_file, Path::new("/sa/ca.crt"));
        // Every variable in the table has been set above.
        assert_eq!(ENV_OVERRIDES.len(), 23);
    }

    #[test]
    fn scaling_defaults_to_none_and_its_keys_are_checked_by_backend() {
        let c = SdkConfig::default();
        assert_eq!(c.scaling.backend, "none");
        assert_eq!(c.scaling.docker.socket, Path::new("/var/run/docker.sock"));
        assert_eq!(c.scaling.docker.stop_timeout_seconds, 30);
        assert_eq!(
            c.scaling.kubernetes.token_file,
            Path::new("/var/run/secrets/kubernetes.io/serviceaccount/token")
        );
        assert_eq!(
            c.scaling.kubernetes.ca_file,
            Path::new("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
        );
        let keys = |yaml: &str| -> Vec<String> {
            match SdkConfig::parse(yaml).unwrap().validate() {
                Ok(()) => Vec::new(),
                Err(e) => e.into_iter().map(|e| e.key).collect(),
            }
        };
        assert_eq!(keys("scaling: {backend: swarm}\n"), ["scaling.backend"]);
        assert_eq!(
            keys("scaling: {backend: kubernetes}\n"),
            ["scaling.kubernetes.deployment"]
        );
        assert_eq!(
            keys("scaling: {backend: kubernetes, kubernetes: {deployment: Alb_1, namespace: 'a b', api: 'kubernetes:443'}}\n"),
            [
                "scaling.kubernetes.deployment",
                "scaling.kubernetes.namespace",
                "scaling.kubernetes.api"
            ]
        );
        assert!(keys("scaling: {backend: kubernetes, kubernetes: {deployment: alb, api: 'https://10.0.0.1:6443'}}\n").is_empty());
        assert_eq!(
            keys("scaling: {backend: docker, docker: {socket: '', project: 'a b', stop_timeout_seconds: 100000}}\n"),
            [
                "scaling.docker.socket",
                "scaling.docker.project",
                "scaling.docker.stop_timeout_seconds"
            ]
        );
        assert_eq!(
            keys("scaling: {backend: docker, docker: {socket: 'tcp://proxy:port'}}\n"),
            ["scaling.docker.socket"]
        );
        assert!(
            keys("scaling: {backend: docker, docker: {socket: 'tcp://docker-proxy:2375'}}\n")
                .is_empty()
        );
        // A backend not chosen is not checked.
        assert!(keys("scaling: {docker: {socket: ''}}\n").is_empty());
        // A variable that does not parse is named.
        let env = env_of(&[("MODULE_SCALING_DOCKER_STOP_TIMEOUT", "soon")]);
        let e = SdkConfig::load(None, &env).unwrap_err();
        assert_eq!(e[0].key, "MODULE_SCALING_DOCKER_STOP_TIMEOUT");
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = SdkConfig::parse("listen: {grcp: '0.0.0.0:1'}\n").unwrap_err();
        assert!(e[0].message.contains("grcp"), "{e:?}");
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let c = SdkConfig {
            nlb: NlbLink {
                addr: "nlb".into(),
                ..NlbLink::default()
            },
            listen: Listen {
                grpc: "localhost:1".into(),
                data: "127.0.0.1:5".into(),
                admin: "127.0.0.1:5".into(),
            },
            instance_id: "has space".into(),
            heartbeat: HeartbeatConfig {
                interval_seconds: 0,
                ..HeartbeatConfig::default()
            },
            ..SdkConfig::default()
        };
        let keys: Vec<String> = c
            .validate()
            .unwrap_err()
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(
            keys,
            [
                "nlb.addr",
                "listen.grpc",
                "listen",
                "instance_id",
                "heartbeat.interval_seconds"
            ]
        );
    }

    #[test]
    fn module_section_is_kept_as_yaml() {
        let c = SdkConfig::parse("module:\n  greeting: hi\n").unwrap();
        assert_eq!(c.module["greeting"].as_str(), Some("hi"));
    }

    #[test]
    fn advertised_address_prefers_the_setting_then_the_listen_ip() {
        let mut c = SdkConfig::default();
        let any: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert_eq!(
            c.advertised("10.0.0.5:8080".parse().unwrap(), "10.9.9.9"),
            "10.0.0.5:8080"
        );
        assert_eq!(c.advertised(any, "10.9.9.9"), "10.9.9.9:8080");
        c.advertise_host = "alb-1".into();
        assert_eq!(c.advertised(any, "10.9.9.9"), "alb-1:8080");
        c.advertise_host = "::1".into();
        assert_eq!(
            c.advertised("[::]:8080".parse().unwrap(), "x"),
            "[::1]:8080"
        );
    }

    #[tokio::test]
    async fn outward_host_is_the_source_address_toward_the_nlb() {
        // A loopback NLB is reached from loopback, whichever 127/8 address.
        assert_eq!(outward_host("127.0.0.1:50051").await, "127.0.0.1");
        // An NLB that does not resolve: the default route's source (or the
        // host name on a machine with no route at all), never empty.
        let host = outward_host("no-such-nlb.invalid:50051").await;
        assert!(!host.is_empty());
        assert_ne!(host, "0.0.0.0");
    }

    #[test]
    fn host_port_splitting() {
        assert_eq!(split_host_port("nlb:50051"), Some(("nlb", 50051)));
        assert_eq!(split_host_port("[::1]:5"), Some(("::1", 5)));
        assert_eq!(split_host_port("nlb"), None);
        assert_eq!(split_host_port("nlb:0"), None);
        assert_eq!(split_host_port(":5"), None);
    }
}
