//! Validation: every problem in a config, each naming its key and why.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;

use serde_yaml_ng::{Mapping, Value};
use shared_types::pb::{ModuleType, Protocol};

use super::{NlbConfig, RouteConfig, Sections, SECTIONS};
use crate::routing::RouteSpec;

/// One thing wrong with a config, at a key path such as `grpc.listen`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// Builds and validates a config from its sections; all errors at once.
pub fn check(sections: &Sections) -> Result<NlbConfig, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let mut good = Mapping::new();
    for (key, value) in sections {
        if !SECTIONS.contains(&key.as_str()) {
            errors.push(ConfigError::new(
                key.clone(),
                format!("unknown key (known sections: {})", SECTIONS.join(", ")),
            ));
            continue;
        }
        // Each section alone, so one bad section does not hide the others.
        let mut one = Mapping::new();
        one.insert(Value::String(key.clone()), value.clone());
        match serde_yaml_ng::from_value::<NlbConfig>(Value::Mapping(one.clone())) {
            Ok(_) => good.extend(one),
            Err(e) => errors.push(ConfigError::new(key.clone(), e.to_string())),
        }
    }
    let config: NlbConfig = match serde_yaml_ng::from_value(Value::Mapping(good)) {
        Ok(c) => c,
        Err(e) => {
            errors.push(ConfigError::new("", e.to_string()));
            return Err(errors);
        }
    };
    semantic(&config, &mut errors);
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(errors)
    }
}

/// A port's TLS entry needs both a certificate and a key (the environment
/// may supply them, so this runs after the overrides).
pub(super) fn check_tls_files(port: &str, files: &super::TlsFiles, errors: &mut Vec<ConfigError>) {
    let upper = port.to_uppercase();
    if files.cert_file.as_os_str().is_empty() {
        errors.push(ConfigError::new(
            format!("tls.{port}.cert_file (or NLB_{upper}_TLS_CERT)"),
            "is required when TLS is on for this port (a PEM certificate chain)",
        ));
    }
    if files.key_file.as_os_str().is_empty() {
        errors.push(ConfigError::new(
            format!("tls.{port}.key_file (or NLB_{upper}_TLS_KEY)"),
            "is required when TLS is on for this port (a PEM private key)",
        ));
    }
    if files
        .client_ca_file
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty())
    {
        errors.push(ConfigError::new(
            format!("tls.{port}.client_ca_file"),
            "is empty; leave it out for TLS without client certificates",
        ));
    }
}

/// A listen address must be `ip:port`.
pub(super) fn check_listen(addr: &str, key: &str, errors: &mut Vec<ConfigError>) {
    if addr.parse::<SocketAddr>().is_err() {
        errors.push(ConfigError::new(
            key,
            format!("{addr:?} is not an ip:port address (e.g. 0.0.0.0:50051 or [::]:50051)"),
        ));
    }
}

fn range<T: PartialOrd + fmt::Display + Copy>(
    value: T,
    lo: T,
    hi: T,
    key: &str,
    errors: &mut Vec<ConfigError>,
) {
    if value < lo || value > hi {
        errors.push(ConfigError::new(
            key,
            format!("{value} is out of range ({lo} to {hi})"),
        ));
    }
}

fn semantic(c: &NlbConfig, errors: &mut Vec<ConfigError>) {
    check_listen(&c.grpc.listen, "grpc.listen", errors);
    check_listen(&c.admin.listen, "admin.listen", errors);
    range(
        c.grpc.max_message_bytes,
        1024,
        64 << 20,
        "grpc.max_message_bytes",
        errors,
    );
    range(
        c.grpc.keepalive_interval_seconds,
        0,
        3600,
        "grpc.keepalive_interval_seconds",
        errors,
    );
    range(
        c.grpc.keepalive_timeout_seconds,
        1,
        600,
        "grpc.keepalive_timeout_seconds",
        errors,
    );
    range(
        c.grpc.handshake_timeout_seconds,
        1,
        300,
        "grpc.handshake_timeout_seconds",
        errors,
    );
    range(
        c.grpc.max_concurrent_streams,
        1,
        100_000,
        "grpc.max_concurrent_streams",
        errors,
    );
    if c.state_file.as_os_str().is_empty() {
        errors.push(ConfigError::new("state_file", "is empty"));
    }
    range(
        c.registry.drain_timeout_seconds,
        0,
        86_400,
        "registry.drain_timeout_seconds",
        errors,
    );
    range(
        c.registry.removal_grace_seconds,
        1,
        86_400,
        "registry.removal_grace_seconds",
        errors,
    );
    range(
        c.registry.max_instances,
        1,
        1_000_000,
        "registry.max_instances",
        errors,
    );
    range(
        c.routing.validate_timeout_ms,
        10,
        60_000,
        "routing.validate_timeout_ms",
        errors,
    );
    range(
        c.routing.module_call_timeout_ms,
        10,
        60_000,
        "routing.module_call_timeout_ms",
        errors,
    );
    range(
        c.routing.slow_start_seconds,
        0,
        3600,
        "routing.slow_start_seconds",
        errors,
    );
    range(
        c.metrics.retention_points,
        1,
        100_000,
        "metrics.retention_points",
        errors,
    );
    range(
        c.metrics.max_series_per_instance,
        1,
        10_000,
        "metrics.max_series_per_instance",
        errors,
    );
    range(
        c.metrics.sample_interval_seconds,
        1,
        3600,
        "metrics.sample_interval_seconds",
        errors,
    );
    range(
        c.metrics.stream_default_interval_seconds,
        1,
        3600,
        "metrics.stream_default_interval_seconds",
        errors,
    );
    check_backends(&c.backends, errors);
    check_routes(&c.routes, &c.backends, errors);
    check_weights(&c.traffic_weights, errors);
    check_autoscaling(&c.autoscaling, errors);
    check_listeners(&c.listeners, &[&c.grpc.listen, &c.admin.listen], errors);
    check_dataplane(&c.dataplane, errors);
}

/// The protocol a listener declares: `None` for `auto`, else the family
/// it names (`tcp` is [`Detected::Unknown`]).
pub fn listener_protocol(name: &str) -> Result<Option<crate::routing::Detected>, String> {
    if name.eq_ignore_ascii_case("auto") {
        return Ok(None);
    }
    Protocol::parse_name(name)
        .ok()
        .and_then(crate::routing::Detected::from_protocol)
        .map(Some)
        .ok_or_else(|| {
            format!(
                "{name:?} is not `auto` or a TCP protocol (tcp, http, https, http2, grpc, \
                 websocket, postgres, mysql, mongodb, redis, rtmp, rtmps)"
            )
        })
}

fn check_listeners(
    listeners: &[super::ListenerConfig],
    taken: &[&str],
    errors: &mut Vec<ConfigError>,
) {
    let mut names = HashSet::new();
    // The control API and admin ports are taken too.
    let mut binds: HashSet<SocketAddr> = taken.iter().filter_map(|a| a.parse().ok()).collect();
    for (i, l) in listeners.iter().enumerate() {
        let key = format!("listeners[{i}]");
        if l.name.is_empty()
            || l.name.len() > 64
            || !l
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            errors.push(ConfigError::new(
                format!("{key}.name"),
                format!(
                    "{:?}: a listener name is 1 to 64 letters, digits, '-', '_' and '.'",
                    l.name
                ),
            ));
        } else if !names.insert(l.name.as_str()) {
            errors.push(ConfigError::new(
                format!("{key}.name"),
                format!("{:?} names two listeners", l.name),
            ));
        }
        match l.bind.parse::<SocketAddr>() {
            Ok(a) if a.port() == 0 => errors.push(ConfigError::new(
                format!("{key}.bind"),
                format!("{:?} has port 0; a listener needs a fixed port", l.bind),
            )),
            Ok(a) => {
                if !binds.insert(a) {
                    errors.push(ConfigError::new(
                        format!("{key}.bind"),
                        format!("{a} is bound by another listener, grpc.listen or admin.listen"),
                    ));
                }
            }
            Err(_) => errors.push(ConfigError::new(
                format!("{key}.bind"),
                format!(
                    "{:?} is not an ip:port address (e.g. 0.0.0.0:443 or [::]:443)",
                    l.bind
                ),
            )),
        }
        if let Err(m) = listener_protocol(&l.protocol) {
            errors.push(ConfigError::new(format!("{key}.protocol"), m));
        }
        for (j, cidr) in l.trusted_proxies.iter().enumerate() {
            if let Err(m) = crate::routing::Cidr::parse(cidr) {
                errors.push(ConfigError::new(format!("{key}.trusted_proxies[{j}]"), m));
            }
        }
        if !l.trusted_proxies.is_empty() && !l.proxy_protocol {
            errors.push(ConfigError::new(
                format!("{key}.trusted_proxies"),
                "applies only with proxy_protocol: true",
            ));
        }
    }
}

fn check_dataplane(d: &super::DataplaneConfig, errors: &mut Vec<ConfigError>) {
    range(
        d.max_connections,
        1,
        10_000_000,
        "dataplane.max_connections",
        errors,
    );
    range(
        d.max_sniffing,
        1,
        10_000_000,
        "dataplane.max_sniffing",
        errors,
    );
    range(
        d.sniff_budget_bytes,
        64,
        1 << 20,
        "dataplane.sniff_budget_bytes",
        errors,
    );
    range(
        d.sniff_timeout_ms,
        1,
        60_000,
        "dataplane.sniff_timeout_ms",
        errors,
    );
    range(
        d.proxy_header_timeout_ms,
        1,
        60_000,
        "dataplane.proxy_header_timeout_ms",
        errors,
    );
    range(
        d.connect_timeout_ms,
        1,
        60_000,
        "dataplane.connect_timeout_ms",
        errors,
    );
    range(
        d.connect_attempts,
        1,
        16,
        "dataplane.connect_attempts",
        errors,
    );
    range(
        d.eject_after_failures,
        1,
        1000,
        "dataplane.eject_after_failures",
        errors,
    );
    range(d.eject_seconds, 1, 3600, "dataplane.eject_seconds", errors);
    range(
        d.idle_timeout_seconds,
        1,
        7 * 86_400,
        "dataplane.idle_timeout_seconds",
        errors,
    );
    range(
        d.tcp_keepalive_seconds,
        0,
        86_400,
        "dataplane.tcp_keepalive_seconds",
        errors,
    );
    range(
        d.buffer_bytes,
        1024,
        1 << 20,
        "dataplane.buffer_bytes",
        errors,
    );
    range(d.threads, 0, 1024, "dataplane.threads", errors);
    range(
        d.drain_timeout_seconds,
        0,
        86_400,
        "dataplane.drain_timeout_seconds",
        errors,
    );
}

/// `host:port` with a port in 1..=65535.
pub fn check_host_port(addr: &str) -> Result<(), String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("{addr:?} is not host:port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(format!("{addr:?} has no valid host"));
    }
    match port.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(()),
        _ => Err(format!("{addr:?} has port {port:?}, expected 1 to 65535")),
    }
}

fn check_backends(backends: &BTreeMap<String, Vec<String>>, errors: &mut Vec<ConfigError>) {
    for (name, addrs) in backends {
        let key = format!("backends.{name}");
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            errors.push(ConfigError::new(
                key.clone(),
                "a pool name uses letters, digits, '-', '_' and '.'",
            ));
        }
        if addrs.is_empty() {
            errors.push(ConfigError::new(
                key.clone(),
                "a pool needs at least one host:port",
            ));
        }
        for (i, addr) in addrs.iter().enumerate() {
            if let Err(m) = check_host_port(addr) {
                errors.push(ConfigError::new(format!("{key}[{i}]"), m));
            }
        }
    }
}

/// Validates operator routes, as `UpdateRouting` does.
pub fn check_routes(
    routes: &[RouteConfig],
    backends: &BTreeMap<String, Vec<String>>,
    errors: &mut Vec<ConfigError>,
) {
    let mut seen = HashSet::new();
    for (i, r) in routes.iter().enumerate() {
        let key = format!("routes[{i}]");
        if let Err(e) = Protocol::parse_name(&r.protocol) {
            errors.push(ConfigError::new(format!("{key}.protocol"), e.to_string()));
            continue;
        }
        if i32::try_from(r.destination_port).is_err() {
            errors.push(ConfigError::new(
                format!("{key}.destination_port"),
                format!(
                    "route {:?}: {} is not a port (1 to 65535, or 0 for any)",
                    r.route_id, r.destination_port
                ),
            ));
            continue;
        }
        match RouteSpec::operator(&r.to_proto()) {
            Ok(spec) => {
                if let crate::routing::Target::Backend(b) = &spec.target {
                    if !backends.contains_key(b) {
                        errors.push(ConfigError::new(
                            format!("{key}.metadata.backend"),
                            format!(
                                "route {:?}: no backend pool named {b:?} in `backends`",
                                r.route_id
                            ),
                        ));
                    }
                }
            }
            Err(field_errors) => {
                for fe in field_errors {
                    errors.push(ConfigError::new(
                        format!("{key}.{}", fe.field),
                        format!("route {:?}: {}", fe.route_id, fe.message),
                    ));
                }
            }
        }
        if !r.route_id.is_empty() && !seen.insert(r.route_id.as_str()) {
            errors.push(ConfigError::new(
                format!("{key}.route_id"),
                format!("route {:?} is listed twice", r.route_id),
            ));
        }
    }
}

/// Per module type, version percentages summing to 100.
fn check_autoscaling(a: &crate::config::AutoscalingConfig, errors: &mut Vec<ConfigError>) {
    range(
        a.evaluation_interval_seconds,
        1,
        3600,
        "autoscaling.evaluation_interval_seconds",
        errors,
    );
    for (t, p) in &a.modules {
        let key = |k: &str| format!("autoscaling.modules.{t}.{k}");
        let name_ok = (1..=64).contains(&t.len())
            && t.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')
            });
        if !name_ok || t == "nlb" {
            errors.push(ConfigError::new(
                format!("autoscaling.modules.{t}"),
                "not a module name (1 to 64 lowercase letters, digits, '-', '_', '.'; not nlb)",
            ));
        }
        range(
            u64::from(p.max_instances),
            1,
            10_000,
            &key("max_instances"),
            errors,
        );
        if p.min_instances > p.max_instances {
            errors.push(ConfigError::new(
                key("min_instances"),
                format!(
                    "{} is above max_instances {}",
                    p.min_instances, p.max_instances
                ),
            ));
        }
        if p.target_connections == 0 && p.target_cpu_percent == 0 {
            errors.push(ConfigError::new(
                format!("autoscaling.modules.{t}"),
                "no target: set target_connections, target_cpu_percent or both",
            ));
        }
        range(
            u64::from(p.target_cpu_percent),
            0,
            100,
            &key("target_cpu_percent"),
            errors,
        );
        if !(p.tolerance.is_finite() && (0.0..1.0).contains(&p.tolerance)) {
            errors.push(ConfigError::new(
                key("tolerance"),
                format!("{} is outside 0 to 1 (a share of the target)", p.tolerance),
            ));
        }
        range(
            p.scale_up_cooldown_seconds,
            0,
            86_400,
            &key("scale_up_cooldown_seconds"),
            errors,
        );
        range(
            p.scale_down_cooldown_seconds,
            0,
            86_400,
            &key("scale_down_cooldown_seconds"),
            errors,
        );
        range(p.window_seconds, 0, 86_400, &key("window_seconds"), errors);
    }
}

pub fn check_weights(
    weights: &BTreeMap<String, BTreeMap<String, u32>>,
    errors: &mut Vec<ConfigError>,
) {
    for (module_type, versions) in weights {
        let key = format!("traffic_weights.{module_type}");
        if let Err(e) = ModuleType::parse_name(module_type) {
            errors.push(ConfigError::new(key.clone(), e.to_string()));
        }
        if versions.keys().any(|v| v.trim().is_empty()) {
            errors.push(ConfigError::new(key.clone(), "a version name is empty"));
        }
        let sum: u64 = versions.values().map(|w| u64::from(*w)).sum();
        if sum != 100 {
            errors.push(ConfigError::new(
                key,
                format!("weights sum to {sum}, they must sum to 100"),
            ));
        }
    }
}
