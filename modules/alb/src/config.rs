//! The ALB's own config: the `module:` section of its config file (the SDK
//! reads the rest). Routes, upstream clusters, limits, TLS, access log.
//!
//! ```yaml
//! module:
//!   routes:
//!     - {id: api, hosts: ["api.example.com"], path: {prefix: /v1}, cluster: api}
//!   clusters:
//!     - name: api
//!       endpoints: [{address: "10.0.0.5:8080", weight: 2}, {address: "10.0.0.6:8080"}]
//!   limits: {max_body_bytes: 10485760}
//!   tls:
//!     certificates: [{cert_file: /etc/alb/api.pem, key_file: /etc/alb/api-key.pem}]
//! ```

use serde::{Deserialize, Serialize};

use crate::cluster::ClusterSpec;
use crate::routes::{RouteSpec, RouteTable};
use crate::tls::ServerTlsSpec;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AlbConfig {
    pub routes: Vec<RouteSpec>,
    pub clusters: Vec<ClusterSpec>,
    pub limits: Limits,
    /// TLS termination; without it the data port serves plaintext only.
    pub tls: Option<ServerTlsSpec>,
    /// One structured line per request on the `access` log target.
    pub access_log: bool,
}

impl Default for AlbConfig {
    fn default() -> Self {
        AlbConfig {
            routes: Vec::new(),
            clusters: Vec::new(),
            limits: Limits::default(),
            tls: None,
            access_log: true,
        }
    }
}

/// Limits on what a client may send.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body; more is 413.
    pub max_body_bytes: u64,
    /// Largest request head (HTTP/1) or header list (HTTP/2); more is 431.
    pub max_header_bytes: usize,
    /// Most request headers (HTTP/1); more is 431.
    pub max_headers: usize,
    /// How long a client may take to send a request's headers (HTTP/1);
    /// the first request of a connection gets a 408 when it is late.
    pub header_read_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 10 * 1024 * 1024,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            header_read_timeout_ms: 10_000,
        }
    }
}

impl AlbConfig {
    /// Parses the `module:` section (`Null`: the defaults).
    pub fn from_section(section: serde_yaml_ng::Value) -> Result<Self, Vec<String>> {
        let config: AlbConfig = if section.is_null() {
            AlbConfig::default()
        } else {
            serde_yaml_ng::from_value(section).map_err(|e| vec![e.to_string()])?
        };
        config.validate()?;
        Ok(config)
    }

    /// Every problem, each naming its route, cluster or key.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (i, c) in self.clusters.iter().enumerate() {
            if !names.insert(c.name.as_str()) {
                errors.push(format!(
                    "clusters[{i}]: the name {:?} is used twice",
                    c.name
                ));
            }
            if let Err(e) = c.validate() {
                errors.push(format!("clusters[{i}]: {e}"));
            }
            if let Some(tls) = &c.tls {
                let wanted = match c.protocol {
                    crate::cluster::UpstreamProtocol::Http1 => "http/1.1",
                    crate::cluster::UpstreamProtocol::Http2 => "h2",
                };
                // The default (`http/1.1`) stands for "not given".
                let given = tls.alpn != ["http/1.1"];
                if given && tls.alpn.iter().any(|p| p != wanted) {
                    errors.push(format!(
                        "clusters[{i}] ({}): tls.alpn {:?}: the ALB offers ALPN from protocol ({wanted} here); leave alpn out",
                        c.name, tls.alpn
                    ));
                }
            }
        }
        if let Err(e) = RouteTable::build(self.routes.clone()) {
            errors.push(format!("routes: {e}"));
        }
        for r in &self.routes {
            if !names.contains(r.cluster.as_str()) {
                errors.push(format!(
                    "routes: route {} names cluster {:?}, which is not in clusters",
                    r.id, r.cluster
                ));
            }
        }
        let l = &self.limits;
        if l.max_body_bytes == 0 {
            errors.push("limits.max_body_bytes: must be at least 1".into());
        }
        if !(1024..=1024 * 1024).contains(&l.max_header_bytes) {
            errors.push(format!(
                "limits.max_header_bytes: {} is outside 1024-1048576",
                l.max_header_bytes
            ));
        }
        if !(1..=10_000).contains(&l.max_headers) {
            errors.push(format!(
                "limits.max_headers: {} is outside 1-10000",
                l.max_headers
            ));
        }
        if l.header_read_timeout_ms == 0 {
            errors.push("limits.header_read_timeout_ms: must be at least 1".into());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}
