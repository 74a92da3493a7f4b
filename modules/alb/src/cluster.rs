//! Upstream clusters for the ALB: which endpoint gets the next request, which
//! endpoints are healthy, and whether a failed request may be retried.
//!
//! A [`Cluster`] holds no HTTP client. The proxy asks it for an endpoint
//! ([`Cluster::pick`]), holds an [`InFlight`] guard while the request runs
//! ([`Endpoint::start`]), and reports how it went ([`Cluster::report`]). Active
//! health checks run in [`Cluster::run_health_checks`] with a probe the proxy
//! supplies.
//!
//! ```yaml
//! name: web
//! endpoints:
//!   - {address: "10.0.0.5:8080", weight: 2}
//!   - {address: "10.0.0.6:8080"}            # weight 1
//!   - {address: "10.0.0.7:8080", weight: 0} # drained: no new requests
//! balance: least_request                    # or round_robin, random
//! health_check: {path: /healthz, expected_statuses: "200-299,404"}
//! outlier: {consecutive_failures: 5}
//! retry: {attempts: 2, budget_percent: 20}
//! ```
//!
//! # Choosing an endpoint
//! An endpoint is *available* when its weight is above 0, its active health
//! check says healthy (every endpoint starts healthy) and passive outlier
//! detection has not ejected it. [`Cluster::pick`] chooses among the available
//! endpoints the caller has not tried yet:
//!
//! - `least_request` (default): weighted power of two choices. Two distinct
//!   endpoints are drawn at random in proportion to their weights and the one
//!   with fewer in-flight requests per unit of weight wins; on a tie the first
//!   drawn wins, so an idle cluster spreads requests exactly by weight.
//! - `round_robin`: smooth weighted round robin as nginx does it. Weights 1:2:3
//!   give the sequence C B A C B C ... and exactly the weight shares.
//! - `random`: one endpoint drawn in proportion to its weight.
//!
//! **Panic mode.** When no endpoint of the cluster is available (all unhealthy,
//! ejected or drained), refusing every request helps nobody: `pick` then
//! chooses among all untried endpoints of weight above 0, with the same
//! policy, and says so in [`Pick::panic`] so the proxy can count it. Panic
//! mode looks at the whole cluster, not at the untried rest: when the only
//! available endpoints were tried already, `pick` answers `None` rather than
//! send a retry to an endpoint known to be bad.
//!
//! **Cost.** `pick` allocates nothing (it clones one `Arc`) and reads the
//! clock once. The random policies draw from the whole cluster with a binary
//! search over cumulative weights and redraw when the draw is not available,
//! up to 4 times, before a linear pass over the endpoints; round robin takes a
//! small mutex for one linear pass. Everything else on the request path
//! (`start`, the guard's drop, `report` on success, `request_started`) is a
//! few relaxed atomic operations.
//!
//! # Passive outlier detection
//! Connect failures, timeouts and 5xx statuses count as failures; any other
//! status or a success resets the count. After `outlier.consecutive_failures`
//! failures in a row an endpoint is ejected for `base_ejection_ms × 2^k`,
//! where `k` is how often it was ejected before, capped at `max_ejection_ms`.
//! `k` goes back to 0 once the endpoint has stayed in for `max_ejection_ms`
//! after its last ejection ended. An ejection that would leave more than
//! `max_ejection_percent` of the weighted endpoints ejected does not happen
//! (so with the default 50 % a single-endpoint cluster is never ejected).
//! Ejections end by time, checked when endpoints are picked: no task runs.
//! Failures reported for an ejected endpoint (requests that were under way)
//! are not counted.
//!
//! # Retry budget
//! [`Cluster::may_retry`] allows a retry while the retries of the last 10 s,
//! this one included, stay within `max(budget_percent % of the requests of the
//! same window, min_retries_per_second × 10)`. Requests are counted by
//! [`Cluster::request_started`], once per client request (never per attempt).
//! The window is ten one-second buckets: the current second and the nine
//! before it, so it covers between 9 and 10 s. Concurrent callers may
//! overshoot the budget by at most their number. `may_retry` does not look at
//! `retry.attempts`: the proxy checks that before asking.
//!
//! # Time
//! Every method that reads the clock has an `*_at(now)` twin for tests.
//! Instants before the cluster was built count as the moment it was built.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Highest endpoint weight; keeps weight arithmetic far from overflow.
pub const MAX_WEIGHT: u32 = 1_000_000;
/// Highest `retry.attempts`.
pub const MAX_ATTEMPTS: u32 = 10;
/// Length of the retry budget window, in one-second buckets.
const WINDOW_SECS: u32 = 10;
/// Random draws over the whole cluster before a linear pass.
const REDRAWS: usize = 4;

// ---------------------------------------------------------------------------
// Spec
// ---------------------------------------------------------------------------

/// One upstream cluster as configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// Unique name; letters, digits, `.`, `_` and `-` (it labels metrics).
    pub name: String,
    /// At least one endpoint; addresses must be distinct.
    pub endpoints: Vec<EndpointSpec>,
    /// How requests are spread. Default `least_request`.
    #[serde(default)]
    pub balance: Balance,
    /// Active health checks; none when absent (every endpoint stays healthy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckSpec>,
    /// Passive outlier detection.
    #[serde(default)]
    pub outlier: OutlierSpec,
    /// Retries and their budget.
    #[serde(default)]
    pub retry: RetrySpec,
    /// Time to open a connection to an endpoint (TCP and TLS). Default
    /// 1000.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time for one attempt, from sending the request to the end of the
    /// response head. Default 30000.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// How long an idle pooled connection is kept. Default 90000.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Idle pooled HTTP/1.1 connections kept per endpoint and data thread;
    /// 0 disables pooling. Default 64.
    #[serde(default = "default_max_idle_per_endpoint")]
    pub max_idle_per_endpoint: u32,
    /// What the endpoints speak: `http1` (default) or `http2` (needed for
    /// gRPC; with TLS it is negotiated by ALPN).
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// TLS to the endpoints (with a client certificate for mutual TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<crate::tls::UpstreamTlsSpec>,
}

/// The HTTP version spoken to a cluster's endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    Http2,
}

impl UpstreamProtocol {
    /// The version of the requests sent to such an endpoint.
    pub fn version(self) -> http::Version {
        match self {
            UpstreamProtocol::Http1 => http::Version::HTTP_11,
            UpstreamProtocol::Http2 => http::Version::HTTP_2,
        }
    }
}

/// One endpoint as configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// `host:port`; an IPv6 host goes in brackets: `[::1]:8080`.
    pub address: String,
    /// Share of requests relative to the other endpoints, up to
    /// [`MAX_WEIGHT`]. Default 1; 0 drains the endpoint (no new requests).
    #[serde(default = "default_weight")]
    pub weight: u32,
}

/// Load balancing policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Weighted power of two choices on in-flight requests per weight.
    #[default]
    LeastRequest,
    /// Smooth weighted round robin (nginx).
    RoundRobin,
    /// Weighted random.
    Random,
}

/// Active health checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckSpec {
    /// Path the probe requests. Default `/`.
    pub path: String,
    /// Time between probes of one endpoint. Default 5000.
    pub interval_ms: u64,
    /// Time a probe may take; at most `interval_ms`. Default 1000.
    pub timeout_ms: u64,
    /// Passed probes in a row that make an unhealthy endpoint healthy.
    /// Default 2.
    pub healthy_threshold: u32,
    /// Failed probes in a row that make a healthy endpoint unhealthy.
    /// Default 3.
    pub unhealthy_threshold: u32,
    /// Statuses that pass: a string `"200-399,404"` or a list
    /// `["200-399", 404]`. Default `200-399`.
    pub expected_statuses: StatusRanges,
}

/// Passive outlier detection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierSpec {
    /// Failures in a row (connect failures, timeouts, 5xx) that eject an
    /// endpoint. Default 5.
    pub consecutive_failures: u32,
    /// First ejection; doubles with each ejection after. Default 30000.
    pub base_ejection_ms: u64,
    /// Longest ejection. Default 300000.
    pub max_ejection_ms: u64,
    /// Most endpoints (of those with weight above 0) ejected at once, in
    /// percent. Default 50.
    pub max_ejection_percent: u32,
}

/// Retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySpec {
    /// Tries per request, the first included, up to [`MAX_ATTEMPTS`]. Default
    /// 2 (one retry); 1 disables retries.
    pub attempts: u32,
    /// Retries allowed as a percentage of requests over 10 s. Default 20.
    pub budget_percent: u32,
    /// Retries per second allowed whatever the request rate. Default 3.
    pub min_retries_per_second: u32,
}

fn default_connect_timeout_ms() -> u64 {
    1000
}
fn default_request_timeout_ms() -> u64 {
    30_000
}
fn default_idle_timeout_ms() -> u64 {
    90_000
}
fn default_max_idle_per_endpoint() -> u32 {
    64
}
fn default_weight() -> u32 {
    1
}

impl Default for HealthCheckSpec {
    fn default() -> Self {
        HealthCheckSpec {
            path: "/".to_owned(),
            interval_ms: 5000,
            timeout_ms: 1000,
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            expected_statuses: StatusRanges::default(),
        }
    }
}

impl Default for OutlierSpec {
    fn default() -> Self {
        OutlierSpec {
            consecutive_failures: 5,
            base_ejection_ms: 30_000,
            max_ejection_ms: 300_000,
            max_ejection_percent: 50,
        }
    }
}

impl Default for RetrySpec {
    fn default() -> Self {
        RetrySpec {
            attempts: 2,
            budget_percent: 20,
            min_retries_per_second: 3,
        }
    }
}

impl EndpointSpec {
    pub fn new(address: impl Into<String>, weight: u32) -> Self {
        EndpointSpec {
            address: address.into(),
            weight,
        }
    }
}

impl ClusterSpec {
    /// A spec with every optional field at its default.
    pub fn new(name: impl Into<String>, endpoints: Vec<EndpointSpec>) -> Self {
        ClusterSpec {
            name: name.into(),
            endpoints,
            balance: Balance::default(),
            health_check: None,
            outlier: OutlierSpec::default(),
            retry: RetrySpec::default(),
            connect_timeout_ms: default_connect_timeout_ms(),
            request_timeout_ms: default_request_timeout_ms(),
            idle_timeout_ms: default_idle_timeout_ms(),
            max_idle_per_endpoint: default_max_idle_per_endpoint(),
            protocol: UpstreamProtocol::default(),
            tls: None,
        }
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// Checks every rule and lists every problem, each naming the cluster and
    /// the field.
    pub fn validate(&self) -> Result<(), ClusterError> {
        let mut problems = Vec::new();
        let mut bad = |field: &str, reason: String| {
            problems.push(FieldError {
                cluster: self.name.clone(),
                field: field.to_owned(),
                reason,
            });
        };

        if self.name.is_empty() {
            bad("name", "must not be empty".to_owned());
        } else if !self
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            bad(
                "name",
                "may hold only letters, digits, '.', '_' and '-'".to_owned(),
            );
        }

        if self.endpoints.is_empty() {
            bad("endpoints", "needs at least one endpoint".to_owned());
        }
        let mut seen = HashSet::new();
        for (i, ep) in self.endpoints.iter().enumerate() {
            if let Err(reason) = check_address(&ep.address) {
                bad(&format!("endpoints[{i}].address"), reason);
            } else if !seen.insert(ep.address.as_str()) {
                bad(
                    &format!("endpoints[{i}].address"),
                    format!("{:?} is listed twice", ep.address),
                );
            }
            if ep.weight > MAX_WEIGHT {
                bad(
                    &format!("endpoints[{i}].weight"),
                    format!("{} is above the maximum {MAX_WEIGHT}", ep.weight),
                );
            }
        }

        if let Some(hc) = &self.health_check {
            if !hc.path.starts_with('/') {
                bad(
                    "health_check.path",
                    format!("{:?} must start with '/'", hc.path),
                );
            } else if hc.path.chars().any(|c| c.is_ascii_control() || c == ' ') {
                bad(
                    "health_check.path",
                    "must not hold spaces or control characters".to_owned(),
                );
            }
            if hc.interval_ms == 0 {
                bad("health_check.interval_ms", "must be above 0".to_owned());
            }
            if hc.timeout_ms == 0 {
                bad("health_check.timeout_ms", "must be above 0".to_owned());
            } else if hc.timeout_ms > hc.interval_ms {
                bad(
                    "health_check.timeout_ms",
                    format!(
                        "{} is longer than interval_ms {}",
                        hc.timeout_ms, hc.interval_ms
                    ),
                );
            }
            if hc.healthy_threshold == 0 {
                bad(
                    "health_check.healthy_threshold",
                    "must be above 0".to_owned(),
                );
            }
            if hc.unhealthy_threshold == 0 {
                bad(
                    "health_check.unhealthy_threshold",
                    "must be above 0".to_owned(),
                );
            }
            if let Err(reason) = hc.expected_statuses.check() {
                bad("health_check.expected_statuses", reason);
            }
        }

        let o = &self.outlier;
        if o.consecutive_failures == 0 {
            bad("outlier.consecutive_failures", "must be above 0".to_owned());
        }
        if o.base_ejection_ms == 0 {
            bad("outlier.base_ejection_ms", "must be above 0".to_owned());
        }
        if o.max_ejection_ms < o.base_ejection_ms {
            bad(
                "outlier.max_ejection_ms",
                format!(
                    "{} is below base_ejection_ms {}",
                    o.max_ejection_ms, o.base_ejection_ms
                ),
            );
        }
        if o.max_ejection_percent > 100 {
            bad(
                "outlier.max_ejection_percent",
                format!("{} is above 100", o.max_ejection_percent),
            );
        }

        let r = &self.retry;
        if r.attempts == 0 || r.attempts > MAX_ATTEMPTS {
            bad(
                "retry.attempts",
                format!(
                    "{} is outside 1..={MAX_ATTEMPTS} (1 means no retries)",
                    r.attempts
                ),
            );
        }
        if r.budget_percent > 100 {
            bad(
                "retry.budget_percent",
                format!("{} is above 100", r.budget_percent),
            );
        }

        for (field, value) in [
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("request_timeout_ms", self.request_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
        ] {
            if value == 0 {
                bad(field, "must be above 0".to_owned());
            }
        }

        if problems.is_empty() {
            Ok(())
        } else {
            Err(ClusterError::Invalid(problems))
        }
    }
}

/// `host:port` with a non-empty host and a port in 1..=65535.
fn check_address(address: &str) -> Result<(), String> {
    let (host, port) = if let Some(rest) = address.strip_prefix('[') {
        let Some((host, port)) = rest.split_once("]:") else {
            return Err(format!("{address:?} is not [ipv6]:port (want host:port)"));
        };
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("{address:?} has an invalid IPv6 address"));
        }
        (host, port)
    } else {
        let Some((host, port)) = address.rsplit_once(':') else {
            return Err(format!("{address:?} has no port (want host:port)"));
        };
        if host.contains(':') {
            return Err(format!(
                "{address:?}: put an IPv6 address in brackets, as [::1]:8080"
            ));
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(format!("{address:?} has no host (want host:port)"));
    }
    if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{address:?} has spaces or control characters"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{address:?} has no valid port (1-65535)")),
    }
}

/// HTTP statuses as inclusive ranges, written `"200-399,404"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusRanges(pub Vec<(u16, u16)>);

impl StatusRanges {
    pub fn contains(&self, status: u16) -> bool {
        self.0.iter().any(|&(lo, hi)| lo <= status && status <= hi)
    }

    /// The rules `validate` applies: at least one range, each inside
    /// 100-599 and not reversed.
    fn check(&self) -> Result<(), String> {
        if self.0.is_empty() {
            return Err("needs at least one status or range".to_owned());
        }
        for &(lo, hi) in &self.0 {
            if lo > hi {
                return Err(format!("range {lo}-{hi} is reversed"));
            }
            if lo < 100 || hi > 599 {
                return Err(format!("{lo}-{hi} is outside 100-599"));
            }
        }
        Ok(())
    }
}

impl Default for StatusRanges {
    fn default() -> Self {
        StatusRanges(vec![(200, 399)])
    }
}

impl fmt::Display for StatusRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(lo, hi)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

impl FromStr for StatusRanges {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut ranges = Vec::new();
        parse_ranges(s, &mut ranges)?;
        Ok(StatusRanges(ranges))
    }
}

fn parse_ranges(s: &str, out: &mut Vec<(u16, u16)>) -> Result<(), String> {
    let code = |t: &str| {
        t.trim()
            .parse::<u16>()
            .map_err(|_| format!("expected_statuses: {t:?} is not a status code"))
    };
    for part in s.split(',') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        match part.split_once('-') {
            Some((lo, hi)) => out.push((code(lo)?, code(hi)?)),
            None => {
                let c = code(part)?;
                out.push((c, c));
            }
        }
    }
    Ok(())
}

impl Serialize for StatusRanges {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StatusRanges {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Item {
            Code(u16),
            Text(String),
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(Item),
            Many(Vec<Item>),
        }
        let items = match Raw::deserialize(d)? {
            Raw::One(item) => vec![item],
            Raw::Many(items) => items,
        };
        let mut ranges = Vec::new();
        for item in items {
            match item {
                Item::Code(c) => ranges.push((c, c)),
                Item::Text(t) => parse_ranges(&t, &mut ranges).map_err(serde::de::Error::custom)?,
            }
        }
        Ok(StatusRanges(ranges))
    }
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// One broken rule of a [`ClusterSpec`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cluster {cluster:?}: {field}: {reason}")]
pub struct FieldError {
    pub cluster: String,
    /// Path of the field, as `endpoints[1].address` or `retry.attempts`.
    pub field: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// The spec breaks one or more rules; every problem is listed.
    #[error("{}", join_problems(.0))]
    Invalid(Vec<FieldError>),
}

fn join_problems(problems: &[FieldError]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

// ---------------------------------------------------------------------------
// Endpoints
// ---------------------------------------------------------------------------

/// One upstream endpoint and its live state.
#[derive(Debug)]
pub struct Endpoint {
    index: usize,
    address: String,
    weight: u32,
    in_flight: AtomicU64,
    /// Set by active health checks only.
    healthy: AtomicBool,
    consecutive_failures: AtomicU32,
    /// End of the last ejection in nanoseconds since the cluster's epoch;
    /// 0 when never ejected. Kept after the ejection ends.
    ejected_until: AtomicU64,
    /// Ejections so far, for the doubling; see the module docs for its reset.
    times_ejected: AtomicU32,
}

impl Endpoint {
    /// Position in the cluster, as given to [`Cluster::report`].
    pub fn index(&self) -> usize {
        self.index
    }

    /// `host:port` as configured.
    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn weight(&self) -> u32 {
        self.weight
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// What the active health checks say; always true without them.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Counts a request as in flight until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            endpoint: Arc::clone(self),
        }
    }

    fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    fn ejected(&self, now_ns: u64) -> bool {
        now_ns < self.ejected_until.load(Ordering::Relaxed)
    }

    fn available(&self, now_ns: u64) -> bool {
        self.weight > 0 && self.healthy() && !self.ejected(now_ns)
    }
}

/// A request in flight to an endpoint; counts it down when dropped.
#[derive(Debug)]
pub struct InFlight {
    endpoint: Arc<Endpoint>,
}

impl InFlight {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The endpoint chosen for one attempt.
#[derive(Debug, Clone)]
pub struct Pick {
    /// Position in the cluster; put it in `tried` for the next attempt and
    /// pass it to [`Cluster::report`].
    pub index: usize,
    pub endpoint: Arc<Endpoint>,
    /// True when no endpoint was available and this one was chosen anyway
    /// (panic mode, see the module docs).
    pub panic: bool,
}

/// How an attempt went, for passive outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The exchange completed and the status, if any, is not 5xx.
    Success,
    /// No connection could be opened (refused, reset, connect timeout).
    ConnectFailure,
    /// The endpoint did not answer within the request timeout.
    Timeout,
    /// The endpoint answered with this status.
    Status(u16),
}

impl Outcome {
    /// Whether it counts towards ejecting the endpoint.
    pub fn is_failure(self) -> bool {
        match self {
            Outcome::Success => false,
            Outcome::ConnectFailure | Outcome::Timeout => true,
            Outcome::Status(s) => (500..600).contains(&s),
        }
    }
}

/// One endpoint's state, for `/status` and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointState {
    pub address: String,
    pub weight: u32,
    pub in_flight: u64,
    pub healthy: bool,
    /// Time left in the current ejection, if ejected.
    pub ejected_until: Option<Duration>,
    pub consecutive_failures: u32,
}

// ---------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------

/// A validated cluster and the live state of its endpoints.
#[derive(Debug)]
pub struct Cluster {
    spec: ClusterSpec,
    endpoints: Vec<Arc<Endpoint>>,
    /// `cumulative[i]` is the sum of the weights of endpoints `0..=i`.
    cumulative: Vec<u64>,
    total_weight: u64,
    /// Smooth round robin's current weights, one per endpoint.
    round_robin: Mutex<Vec<i64>>,
    /// Serializes ejection decisions so the percentage cap holds.
    ejection: Mutex<()>,
    budget: RetryBudget,
    epoch: Instant,
}

impl Cluster {
    /// Validates `spec` and builds the cluster; every endpoint starts healthy
    /// and idle.
    pub fn new(spec: ClusterSpec) -> Result<Arc<Cluster>, ClusterError> {
        spec.validate()?;
        let endpoints: Vec<Arc<Endpoint>> = spec
            .endpoints
            .iter()
            .enumerate()
            .map(|(index, ep)| {
                Arc::new(Endpoint {
                    index,
                    address: ep.address.clone(),
                    weight: ep.weight,
                    in_flight: AtomicU64::new(0),
                    healthy: AtomicBool::new(true),
                    consecutive_failures: AtomicU32::new(0),
                    ejected_until: AtomicU64::new(0),
                    times_ejected: AtomicU32::new(0),
                })
            })
            .collect();
        let cumulative: Vec<u64> = endpoints
            .iter()
            .scan(0u64, |sum, ep| {
                *sum += u64::from(ep.weight);
                Some(*sum)
            })
            .collect();
        let total_weight = cumulative.last().copied().unwrap_or(0);
        let round_robin = Mutex::new(vec![0; endpoints.len()]);
        Ok(Arc::new(Cluster {
            spec,
            endpoints,
            cumulative,
            total_weight,
            round_robin,
            ejection: Mutex::new(()),
            budget: RetryBudget::default(),
            epoch: Instant::now(),
        }))
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The spec it was built from, for the proxy's timeouts and pool sizes.
    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// Chooses an endpoint for the next attempt, skipping the indexes in
    /// `tried`. `None` when no endpoint is left (see the module docs).
    pub fn pick(&self, tried: &[usize]) -> Option<Pick> {
        self.pick_at(tried, Instant::now())
    }

    pub fn pick_at(&self, tried: &[usize], now: Instant) -> Option<Pick> {
        let now_ns = self.nanos(now);
        let usable = |i: usize| !tried.contains(&i) && self.endpoints[i].available(now_ns);
        let (index, panic) = match self.choose(&usable) {
            Some(i) => (i, false),
            None => {
                if self.endpoints.iter().any(|ep| ep.available(now_ns)) {
                    return None;
                }
                let last_resort = |i: usize| !tried.contains(&i) && self.endpoints[i].weight > 0;
                (self.choose(&last_resort)?, true)
            }
        };
        Some(Pick {
            index,
            endpoint: Arc::clone(&self.endpoints[index]),
            panic,
        })
    }

    /// Records how an attempt on endpoint `index` went. An index out of range
    /// is ignored.
    pub fn report(&self, index: usize, outcome: Outcome) {
        self.report_at(index, outcome, Instant::now());
    }

    pub fn report_at(&self, index: usize, outcome: Outcome, now: Instant) {
        let Some(ep) = self.endpoints.get(index) else {
            return;
        };
        if !outcome.is_failure() {
            if ep.consecutive_failures.load(Ordering::Relaxed) != 0 {
                ep.consecutive_failures.store(0, Ordering::Relaxed);
            }
            return;
        }
        let now_ns = self.nanos(now);
        if ep.ejected(now_ns) {
            return;
        }
        let failures = ep
            .consecutive_failures
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_add(1))
            })
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        if failures >= self.spec.outlier.consecutive_failures {
            self.try_eject(ep, failures, outcome, now_ns);
        }
    }

    fn try_eject(&self, ep: &Endpoint, failures: u32, last: Outcome, now_ns: u64) {
        let o = &self.spec.outlier;
        let _serial = self.ejection.lock();
        if ep.weight == 0 || ep.ejected(now_ns) {
            return;
        }
        let serving = self.endpoints.iter().filter(|e| e.weight > 0).count() as u64;
        let ejected = self
            .endpoints
            .iter()
            .filter(|e| e.weight > 0 && e.ejected(now_ns))
            .count() as u64;
        if (ejected + 1) * 100 > serving * u64::from(o.max_ejection_percent) {
            // Warn once when the threshold is reached, not on every failure
            // after it.
            if failures == o.consecutive_failures {
                tracing::warn!(
                    cluster = %self.spec.name,
                    endpoint = %ep.address,
                    failures,
                    ejected,
                    "endpoint keeps failing but is not ejected: {} of {} endpoints are ejected already (max_ejection_percent {})",
                    ejected,
                    serving,
                    o.max_ejection_percent
                );
            }
            return;
        }
        let max_ns = o.max_ejection_ms.saturating_mul(1_000_000);
        let last_until = ep.ejected_until.load(Ordering::Relaxed);
        let mut times = ep.times_ejected.load(Ordering::Relaxed);
        if last_until != 0 && now_ns >= last_until.saturating_add(max_ns) {
            times = 0;
        }
        let ms = 2u64
            .checked_pow(times)
            .and_then(|m| o.base_ejection_ms.checked_mul(m))
            .map_or(o.max_ejection_ms, |ms| ms.min(o.max_ejection_ms));
        ep.ejected_until.store(
            now_ns.saturating_add(ms.saturating_mul(1_000_000)),
            Ordering::Relaxed,
        );
        ep.times_ejected
            .store(times.saturating_add(1), Ordering::Relaxed);
        ep.consecutive_failures.store(0, Ordering::Relaxed);
        tracing::warn!(
            cluster = %self.spec.name,
            endpoint = %ep.address,
            failures,
            last_outcome = ?last,
            ejection_ms = ms,
            "endpoint ejected after {failures} failures in a row"
        );
    }

    /// Counts one client request for the retry budget. Call it once per
    /// request, not per attempt.
    pub fn request_started(&self) {
        self.request_started_at(Instant::now());
    }

    pub fn request_started_at(&self, now: Instant) {
        let sec = self.second(now);
        bump(&self.budget.requests, sec);
    }

    /// Whether the budget allows one more retry; a `true` counts the retry.
    pub fn may_retry(&self) -> bool {
        self.may_retry_at(Instant::now())
    }

    pub fn may_retry_at(&self, now: Instant) -> bool {
        let r = &self.spec.retry;
        let sec = self.second(now);
        let requests = window_sum(&self.budget.requests, sec);
        let retries = window_sum(&self.budget.retries, sec);
        let allowed = (requests * u64::from(r.budget_percent) / 100)
            .max(u64::from(r.min_retries_per_second) * u64::from(WINDOW_SECS));
        if retries < allowed {
            bump(&self.budget.retries, sec);
            true
        } else {
            false
        }
    }

    /// Every endpoint's state, in configuration order.
    pub fn snapshot(&self) -> Vec<EndpointState> {
        self.snapshot_at(Instant::now())
    }

    pub fn snapshot_at(&self, now: Instant) -> Vec<EndpointState> {
        let now_ns = self.nanos(now);
        self.endpoints
            .iter()
            .map(|ep| {
                let until = ep.ejected_until.load(Ordering::Relaxed);
                EndpointState {
                    address: ep.address.clone(),
                    weight: ep.weight,
                    in_flight: ep.in_flight(),
                    healthy: ep.healthy(),
                    ejected_until: (now_ns < until).then(|| Duration::from_nanos(until - now_ns)),
                    consecutive_failures: ep.consecutive_failures.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Probes every endpoint each `health_check.interval_ms` until `stop`
    /// turns true or its sender drops; returns at once without a
    /// `health_check` section. Probes of one endpoint never overlap; the
    /// endpoints' first probes are spread over the first interval. `probe`
    /// gets the endpoint, the path and the timeout, and answers the status
    /// or why it got none; a probe that outlives the timeout fails. When the
    /// checks stop, endpoints keep the health they had.
    pub async fn run_health_checks<F, Fut>(
        self: Arc<Self>,
        probe: F,
        mut stop: watch::Receiver<bool>,
    ) where
        F: Fn(Arc<Endpoint>, String, Duration) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<u16, String>> + Send + 'static,
    {
        let Some(hc) = self.spec.health_check.clone() else {
            return;
        };
        if *stop.borrow_and_update() {
            return;
        }
        let hc = Arc::new(hc);
        let probe = Arc::new(probe);
        let interval = Duration::from_millis(hc.interval_ms);
        let n = self.endpoints.len() as u32;
        let mut tasks = JoinSet::new();
        for (i, ep) in self.endpoints.iter().enumerate() {
            let offset = interval * i as u32 / n.max(1);
            tasks.spawn(check_endpoint(
                Arc::clone(&self),
                Arc::clone(ep),
                Arc::clone(&probe),
                Arc::clone(&hc),
                offset,
            ));
        }
        loop {
            tokio::select! {
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow_and_update() {
                        break;
                    }
                }
                Some(ended) = tasks.join_next() => {
                    if let Err(e) = ended {
                        tracing::error!(
                            cluster = %self.spec.name,
                            "a health check task ended: {e}; that endpoint is no longer checked"
                        );
                    }
                }
            }
        }
        tasks.shutdown().await;
    }

    fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn second(&self, now: Instant) -> u32 {
        u32::try_from(now.saturating_duration_since(self.epoch).as_secs()).unwrap_or(u32::MAX)
    }

    /// Applies the balancing policy to the endpoints `ok` accepts.
    fn choose(&self, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
        match self.spec.balance {
            Balance::Random => self.draw(ok, None),
            Balance::LeastRequest => {
                let a = self.draw(ok, None)?;
                let Some(b) = self.draw(ok, Some(a)) else {
                    return Some(a);
                };
                let (ea, eb) = (&self.endpoints[a], &self.endpoints[b]);
                // b is less loaded when in_flight_b / w_b < in_flight_a / w_a.
                let load_a = u128::from(ea.in_flight()) * u128::from(eb.weight);
                let load_b = u128::from(eb.in_flight()) * u128::from(ea.weight);
                Some(if load_b < load_a { b } else { a })
            }
            Balance::RoundRobin => {
                let mut current = self.round_robin.lock();
                let mut total = 0i64;
                let mut best: Option<usize> = None;
                for i in 0..self.endpoints.len() {
                    if !ok(i) {
                        continue;
                    }
                    let w = i64::from(self.endpoints[i].weight);
                    current[i] += w;
                    total += w;
                    if best.is_none_or(|b| current[i] > current[b]) {
                        best = Some(i);
                    }
                }
                let b = best?;
                current[b] -= total;
                Some(b)
            }
        }
    }

    /// One endpoint that `ok` accepts, other than `except`, drawn in
    /// proportion to weight.
    fn draw(&self, ok: &dyn Fn(usize) -> bool, except: Option<usize>) -> Option<usize> {
        if self.total_weight == 0 {
            return None;
        }
        let ok = |i: usize| Some(i) != except && ok(i);
        // One endpoint: nothing to draw (least_request's second draw, which
        // can never succeed, took five random numbers a request).
        if self.endpoints.len() == 1 {
            return ok(0).then_some(0);
        }
        // Draws over the whole cluster, kept only when acceptable: exactly the
        // weighted draw among the acceptable ones, in O(log n) when most are.
        for _ in 0..REDRAWS {
            let r = fastrand::u64(0..self.total_weight);
            let i = self.cumulative.partition_point(|&c| c <= r);
            if ok(i) {
                return Some(i);
            }
        }
        let weight = |i: usize| u64::from(self.endpoints[i].weight);
        let total: u64 = (0..self.endpoints.len())
            .filter(|&i| ok(i))
            .map(weight)
            .sum();
        if total == 0 {
            return None;
        }
        let mut r = fastrand::u64(0..total);
        for i in (0..self.endpoints.len()).filter(|&i| ok(i)) {
            let w = weight(i);
            if r < w {
                return Some(i);
            }
            r -= w;
        }
        None
    }
}

/// The loop for one endpoint's active health checks.
async fn check_endpoint<F, Fut>(
    cluster: Arc<Cluster>,
    ep: Arc<Endpoint>,
    probe: Arc<F>,
    hc: Arc<HealthCheckSpec>,
    offset: Duration,
) where
    F: Fn(Arc<Endpoint>, String, Duration) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<u16, String>> + Send + 'static,
{
    let timeout = Duration::from_millis(hc.timeout_ms);
    tokio::time::sleep(offset).await;
    let mut ticker = tokio::time::interval(Duration::from_millis(hc.interval_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut passed, mut failed) = (0u32, 0u32);
    loop {
        ticker.tick().await;
        let answer =
            tokio::time::timeout(timeout, probe(Arc::clone(&ep), hc.path.clone(), timeout)).await;
        let failure = match answer {
            Ok(Ok(status)) if hc.expected_statuses.contains(status) => None,
            Ok(Ok(status)) => Some(format!(
                "status {status} is not in {}",
                hc.expected_statuses
            )),
            Ok(Err(reason)) => Some(reason),
            Err(_) => Some(format!("no answer within {} ms", hc.timeout_ms)),
        };
        match failure {
            None => {
                failed = 0;
                passed = passed.saturating_add(1);
                if !ep.healthy() && passed >= hc.healthy_threshold {
                    ep.set_healthy(true);
                    tracing::info!(
                        cluster = %cluster.spec.name,
                        endpoint = %ep.address,
                        "endpoint healthy again: passed {passed} health checks in a row on {}",
                        hc.path
                    );
                }
            }
            Some(reason) => {
                passed = 0;
                failed = failed.saturating_add(1);
                if ep.healthy() && failed >= hc.unhealthy_threshold {
                    ep.set_healthy(false);
                    tracing::warn!(
                        cluster = %cluster.spec.name,
                        endpoint = %ep.address,
                        %reason,
                        "endpoint unhealthy: failed {failed} health checks in a row on {}",
                        hc.path
                    );
                } else {
                    tracing::debug!(
                        cluster = %cluster.spec.name,
                        endpoint = %ep.address,
                        %reason,
                        "health check failed"
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Retry budget
// ---------------------------------------------------------------------------

/// Ten one-second buckets per counter; each word packs the second it counts
/// (high 32 bits, seconds since the cluster's epoch) and the count (low 32).
#[derive(Debug, Default)]
struct RetryBudget {
    requests: [AtomicU64; WINDOW_SECS as usize],
    retries: [AtomicU64; WINDOW_SECS as usize],
}

fn pack(sec: u32, count: u32) -> u64 {
    (u64::from(sec) << 32) | u64::from(count)
}

fn unpack(word: u64) -> (u32, u32) {
    ((word >> 32) as u32, word as u32)
}

/// Adds one to the bucket of second `sec`, restarting the bucket when it
/// still holds an older second. An event for a second older than the
/// bucket's is dropped.
fn bump(buckets: &[AtomicU64; WINDOW_SECS as usize], sec: u32) {
    let slot = &buckets[(sec % WINDOW_SECS) as usize];
    let mut word = slot.load(Ordering::Relaxed);
    loop {
        let (s, count) = unpack(word);
        let next = if s == sec {
            pack(sec, count.saturating_add(1))
        } else if s < sec {
            pack(sec, 1)
        } else {
            return;
        };
        match slot.compare_exchange_weak(word, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(actual) => word = actual,
        }
    }
}

/// The counts of second `sec` and the nine before it.
fn window_sum(buckets: &[AtomicU64; WINDOW_SECS as usize], sec: u32) -> u64 {
    buckets
        .iter()
        .map(|b| unpack(b.load(Ordering::Relaxed)))
        .filter(|&(s, _)| s <= sec && sec - s < WINDOW_SECS)
        .map(|(_, count)| u64::from(count))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(balance: Balance, weights: &[u32]) -> ClusterSpec {
        let endpoints = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| EndpointSpec::new(format!("10.0.0.{}:80", i + 1), w))
            .collect();
        let mut spec = ClusterSpec::new("web", endpoints);
        spec.balance = balance;
        spec
    }

    fn cluster(balance: Balance, weights: &[u32]) -> Arc<Cluster> {
        Cluster::new(spec(balance, weights)).unwrap()
    }

    /// Counts picks per endpoint, each request finishing before the next.
    fn sequential_counts(c: &Cluster, picks: usize) -> Vec<usize> {
        let mut counts = vec![0; c.endpoints().len()];
        for _ in 0..picks {
            let pick = c.pick(&[]).unwrap();
            let _guard = pick.endpoint.start();
            counts[pick.index] += 1;
        }
        counts
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn each_policy_spreads_sequential_requests_by_weight() {
        // The documented spread: weights 1:2:3, 60,000 picks, each endpoint
        // within ±3 % of its share (round robin exactly). Seeded; over 200
        // seeds the worst endpoint was 2.6 % off (least_request) and 2.3 %
        // (random).
        for balance in [Balance::LeastRequest, Balance::RoundRobin, Balance::Random] {
            fastrand::seed(7);
            let c = cluster(balance, &[1, 2, 3]);
            let counts = sequential_counts(&c, 60_000);
            let expected = [10_000.0, 20_000.0, 30_000.0];
            for (i, (&got, want)) in counts.iter().zip(expected).enumerate() {
                let off = (got as f64 - want).abs() / want;
                assert!(
                    off <= 0.03,
                    "{balance:?}: endpoint {i} got {got}, want {want} ± 3 %"
                );
            }
            if balance == Balance::RoundRobin {
                assert_eq!(counts, vec![10_000, 20_000, 30_000]);
            }
        }
    }

    #[test]
    fn round_robin_is_smooth() {
        let c = cluster(Balance::RoundRobin, &[1, 2, 3]);
        let order: Vec<usize> = (0..12).map(|_| c.pick(&[]).unwrap().index).collect();
        // nginx's order for weights a=1, b=2, c=3: c b a c b c, repeated.
        assert_eq!(order, [2, 1, 0, 2, 1, 2, 2, 1, 0, 2, 1, 2]);
    }

    #[test]
    fn least_request_sends_new_requests_to_the_least_loaded() {
        fastrand::seed(11);
        let c = cluster(Balance::LeastRequest, &[1, 1, 1]);
        // Ten requests held on endpoint 0.
        let mut held: Vec<InFlight> = (0..10).map(|_| c.endpoints()[0].start()).collect();
        // The next ten all go elsewhere: two distinct choices always include
        // an endpoint less loaded than endpoint 0.
        for _ in 0..10 {
            let pick = c.pick(&[]).unwrap();
            assert_ne!(pick.index, 0, "a new request went to the busiest endpoint");
            held.push(pick.endpoint.start());
        }
        // Held load stays even: over 200 seeds the widest spread of 300 held
        // requests was 5.
        for _ in 0..280 {
            held.push(c.pick(&[]).unwrap().endpoint.start());
        }
        let loads: Vec<u64> = c.endpoints().iter().map(|e| e.in_flight()).collect();
        assert_eq!(loads.iter().sum::<u64>(), 300);
        let (min, max) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
        assert!(max - min <= 6, "in-flight spread too wide: {loads:?}");
        drop(held);
        assert!(c.endpoints().iter().all(|e| e.in_flight() == 0));
    }

    #[test]
    fn least_request_weighs_held_load() {
        // 600 requests held on weights 1:2:3 end near 100:200:300 in flight
        // (within 2 over 200 seeds).
        fastrand::seed(3);
        let c = cluster(Balance::LeastRequest, &[1, 2, 3]);
        let held: Vec<InFlight> = (0..600)
            .map(|_| c.pick(&[]).unwrap().endpoint.start())
            .collect();
        let loads: Vec<u64> = c.endpoints().iter().map(|e| e.in_flight()).collect();
        for (load, want) in loads.iter().zip([100u64, 200, 300]) {
            assert!(
                load.abs_diff(want) <= 5,
                "loads {loads:?}, want 100:200:300"
            );
        }
        drop(held);
    }

    #[test]
    fn pick_skips_tried_drained_unhealthy_and_ejected() {
        for balance in [Balance::LeastRequest, Balance::RoundRobin, Balance::Random] {
            let c = cluster(balance, &[1, 1, 0, 1, 1]);
            c.endpoints()[1].set_healthy(false);
            let now = Instant::now();
            // Eject endpoint 3 (5 endpoints, 4 serving: 50 % allows 2).
            for _ in 0..5 {
                c.report_at(3, Outcome::ConnectFailure, now);
            }
            for _ in 0..200 {
                let pick = c.pick_at(&[4], now).unwrap();
                assert_eq!(pick.index, 0, "{balance:?}");
                assert!(!pick.panic);
            }
            // The only available endpoint was tried: no panic, no pick.
            assert!(c.pick_at(&[0, 4], now).is_none(), "{balance:?}");
        }
    }

    #[test]
    fn panic_mode_uses_every_untried_endpoint_with_weight() {
        for balance in [Balance::LeastRequest, Balance::RoundRobin, Balance::Random] {
            let c = cluster(balance, &[1, 1, 0]);
            for ep in c.endpoints() {
                ep.set_healthy(false);
            }
            let mut seen = [false; 3];
            for _ in 0..100 {
                let pick = c.pick(&[]).unwrap();
                assert!(pick.panic);
                seen[pick.index] = true;
            }
            assert_eq!(seen, [true, true, false], "{balance:?}");
            assert_eq!(c.pick(&[0]).unwrap().index, 1);
            assert!(c.pick(&[0, 1]).is_none());
        }
        // Every endpoint drained: nothing to pick, even in panic.
        assert!(cluster(Balance::Random, &[0, 0]).pick(&[]).is_none());
    }

    #[test]
    fn failures_eject_and_success_resets_the_count() {
        let c = cluster(Balance::Random, &[1, 1, 1, 1]);
        let now = Instant::now();
        for _ in 0..4 {
            c.report_at(0, Outcome::Status(503), now);
        }
        c.report_at(0, Outcome::Success, now);
        c.report_at(0, Outcome::Status(404), now);
        assert_eq!(c.snapshot_at(now)[0].consecutive_failures, 0);
        for outcome in [
            Outcome::ConnectFailure,
            Outcome::Timeout,
            Outcome::Status(500),
            Outcome::Status(502),
        ] {
            c.report_at(0, outcome, now);
        }
        assert_eq!(c.snapshot_at(now)[0].ejected_until, None);
        assert_eq!(c.snapshot_at(now)[0].consecutive_failures, 4);
        c.report_at(0, Outcome::Timeout, now);
        let state = &c.snapshot_at(now)[0];
        assert_eq!(state.ejected_until, Some(ms(30_000)));
        assert_eq!(state.consecutive_failures, 0);
        // Failures of requests under way while ejected are not counted.
        c.report_at(0, Outcome::Timeout, now);
        assert_eq!(c.snapshot_at(now)[0].consecutive_failures, 0);
        assert!((0..100).all(|_| c.pick_at(&[], now).unwrap().index != 0));
    }

    #[test]
    fn ejection_doubles_up_to_the_maximum_and_ends_by_time() {
        let c = cluster(Balance::Random, &[1, 1]);
        let eject = |at: Instant| {
            for _ in 0..5 {
                c.report_at(0, Outcome::ConnectFailure, at);
            }
        };
        // 2 endpoints at 50 %: one may be ejected.
        let mut now = Instant::now();
        let mut want = Vec::new();
        let mut got = Vec::new();
        for expected in [30_000, 60_000, 120_000, 240_000, 300_000, 300_000] {
            eject(now);
            let left = c.snapshot_at(now)[0].ejected_until.unwrap();
            got.push(left.as_millis() as u64);
            want.push(expected);
            // Still out just before the end, back in at the end.
            assert!(c.endpoints()[0].ejected(c.nanos(now + left - ms(1))));
            now += left;
            assert_eq!(c.snapshot_at(now)[0].ejected_until, None);
            assert!(c.endpoints()[0].available(c.nanos(now)));
        }
        assert_eq!(got, want);
        // After max_ejection_ms without an ejection the doubling starts over.
        now += ms(300_000);
        eject(now);
        assert_eq!(c.snapshot_at(now)[0].ejected_until, Some(ms(30_000)));
    }

    #[test]
    fn ejections_stop_at_max_ejection_percent() {
        // 4 serving endpoints (plus a drained one) at 50 %: two may be out.
        let c = cluster(Balance::Random, &[1, 1, 1, 1, 0]);
        let now = Instant::now();
        for i in 0..4 {
            for _ in 0..5 {
                c.report_at(i, Outcome::Status(500), now);
            }
        }
        let ejected: Vec<bool> = c
            .snapshot_at(now)
            .iter()
            .map(|s| s.ejected_until.is_some())
            .collect();
        assert_eq!(ejected, [true, true, false, false, false]);
        // The refused ones keep counting and are ejected once room frees up.
        assert_eq!(c.snapshot_at(now)[2].consecutive_failures, 5);
        let later = now + ms(30_000);
        c.report_at(2, Outcome::Status(500), later);
        assert!(c.snapshot_at(later)[2].ejected_until.is_some());

        // A single endpoint at 50 % is never ejected.
        let single = cluster(Balance::Random, &[1]);
        for _ in 0..20 {
            single.report_at(0, Outcome::Timeout, now);
        }
        assert_eq!(single.snapshot_at(now)[0].ejected_until, None);
        // Out-of-range indexes are ignored.
        single.report_at(9, Outcome::Timeout, now);
    }

    #[test]
    fn retry_budget_allows_the_floor_then_a_share_of_requests() {
        let mut s = spec(Balance::Random, &[1]);
        s.retry.budget_percent = 20;
        s.retry.min_retries_per_second = 3;
        let c = Cluster::new(s).unwrap();
        let t0 = c.epoch;
        // No requests: the floor of 3/s over 10 s.
        let allowed = (0..100).filter(|_| c.may_retry_at(t0)).count();
        assert_eq!(allowed, 30);
        // 1000 requests: 20 % of them = 200 retries in the window, 30 used.
        for _ in 0..1000 {
            c.request_started_at(t0);
        }
        let allowed = (0..1000).filter(|_| c.may_retry_at(t0)).count();
        assert_eq!(allowed, 170);
        // Nine seconds on, the window still holds second 0.
        assert!(!c.may_retry_at(t0 + ms(9_999)));
        // Ten seconds on, second 0 has left the window: the floor again.
        let t10 = t0 + ms(10_000);
        let allowed = (0..100).filter(|_| c.may_retry_at(t10)).count();
        assert_eq!(allowed, 30);
        // A late report for a second whose bucket holds a newer one is
        // dropped.
        c.request_started_at(t10);
        c.request_started_at(t0);
        assert_eq!(window_sum(&c.budget.requests, 10), 1);
    }

    #[test]
    fn retry_budget_of_zero_refuses_every_retry() {
        let mut s = spec(Balance::Random, &[1]);
        s.retry.budget_percent = 0;
        s.retry.min_retries_per_second = 0;
        let c = Cluster::new(s).unwrap();
        for _ in 0..100 {
            c.request_started();
        }
        assert!(!c.may_retry());
    }

    /// What the fake probe answers per address; `None` never answers.
    type Answers = Arc<Mutex<std::collections::HashMap<String, Option<Result<u16, String>>>>>;
    type ProbeFuture = std::pin::Pin<Box<dyn Future<Output = Result<u16, String>> + Send>>;

    /// A probe answering from `answers` and counting its calls.
    fn fake_probe(
        answers: Answers,
        probes: Arc<AtomicU32>,
    ) -> impl Fn(Arc<Endpoint>, String, Duration) -> ProbeFuture + Send + Sync + 'static {
        move |ep, path, _timeout| {
            assert_eq!(path, "/healthz");
            probes.fetch_add(1, Ordering::Relaxed);
            let answer = answers.lock().get(ep.address()).cloned().flatten();
            Box::pin(async move {
                match answer {
                    Some(a) => a,
                    None => std::future::pending().await,
                }
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn health_checks_flip_endpoints_after_their_thresholds() {
        let mut s = spec(Balance::Random, &[1, 1]);
        s.health_check = Some(HealthCheckSpec {
            path: "/healthz".to_owned(),
            ..HealthCheckSpec::default()
        });
        let c = Cluster::new(s).unwrap();
        let (a, b) = ("10.0.0.1:80".to_owned(), "10.0.0.2:80".to_owned());
        let answers: Answers = Arc::default();
        answers.lock().insert(a.clone(), Some(Ok(503)));
        answers.lock().insert(b.clone(), Some(Ok(200)));
        let probes = Arc::new(AtomicU32::new(0));
        let (stop_tx, stop_rx) = watch::channel(false);
        let run = tokio::spawn(
            Arc::clone(&c).run_health_checks(fake_probe(answers.clone(), probes.clone()), stop_rx),
        );

        // Endpoint a is probed at 0, 5 and 10 s: unhealthy after the third.
        tokio::time::sleep(ms(9_000)).await;
        assert!(c.endpoints()[0].healthy(), "two failures are not enough");
        tokio::time::sleep(ms(2_000)).await;
        assert!(!c.endpoints()[0].healthy());
        assert!(c.endpoints()[1].healthy());
        assert_eq!(c.pick(&[]).unwrap().index, 1);

        // It answers well again: healthy after two passes (15 s, 20 s).
        answers.lock().insert(a.clone(), Some(Ok(204)));
        tokio::time::sleep(ms(5_000)).await;
        assert!(!c.endpoints()[0].healthy());
        tokio::time::sleep(ms(5_000)).await;
        assert!(c.endpoints()[0].healthy());

        // Endpoint b (first probed at 2.5 s) stops answering: timeouts fail
        // it at 22.5, 27.5 and 32.5 s.
        answers.lock().insert(b.clone(), None);
        tokio::time::sleep(ms(13_000)).await;
        assert!(!c.endpoints()[1].healthy());
        // An error string fails a probe too; a is healthy throughout.
        answers
            .lock()
            .insert(a.clone(), Some(Err("connection refused".into())));
        tokio::time::sleep(ms(10_000)).await;
        assert!(c.endpoints()[0].healthy(), "two failures are not enough");
        tokio::time::sleep(ms(5_000)).await;
        assert!(!c.endpoints()[0].healthy());

        // Stopping ends the run and the probes.
        stop_tx.send(true).unwrap();
        run.await.unwrap();
        let after = probes.load(Ordering::Relaxed);
        tokio::time::sleep(ms(60_000)).await;
        assert_eq!(probes.load(Ordering::Relaxed), after);
    }

    #[tokio::test(start_paused = true)]
    async fn health_checks_end_without_a_section_or_a_sender() {
        let c = cluster(Balance::Random, &[1]);
        let (_tx, rx) = watch::channel(false);
        let probes = Arc::new(AtomicU32::new(0));
        Arc::clone(&c)
            .run_health_checks(fake_probe(Answers::default(), probes.clone()), rx)
            .await;

        let mut s = spec(Balance::Random, &[1]);
        s.health_check = Some(HealthCheckSpec {
            path: "/healthz".to_owned(),
            ..HealthCheckSpec::default()
        });
        let c = Cluster::new(s).unwrap();
        let (tx, rx) = watch::channel(false);
        let run = tokio::spawn(
            Arc::clone(&c).run_health_checks(fake_probe(Answers::default(), probes.clone()), rx),
        );
        tokio::time::sleep(ms(1)).await;
        drop(tx);
        run.await.unwrap();
        assert_eq!(probes.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn yaml_spec_takes_defaults_and_both_status_forms() {
        let yaml = r#"
name: web
endpoints:
  - {address: "10.0.0.5:8080", weight: 2}
  - {address: "[::1]:8080"}
health_check: {path: /healthz, expected_statuses: "200-299, 404"}
"#;
        let s: ClusterSpec = serde_yaml_ng::from_str(yaml).unwrap();
        s.validate().unwrap();
        assert_eq!(s.endpoints[1].weight, 1);
        assert_eq!(s.balance, Balance::LeastRequest);
        let hc = s.health_check.as_ref().unwrap();
        assert_eq!(hc.interval_ms, 5000);
        assert_eq!(
            hc.expected_statuses,
            StatusRanges(vec![(200, 299), (404, 404)])
        );
        assert!(hc.expected_statuses.contains(404) && !hc.expected_statuses.contains(300));
        assert_eq!(s.outlier, OutlierSpec::default());
        assert_eq!(s.retry.attempts, 2);
        assert_eq!(s.request_timeout(), ms(30_000));
        assert_eq!(s.max_idle_per_endpoint, 64);
        // The spec survives a round trip.
        let back: ClusterSpec =
            serde_yaml_ng::from_str(&serde_yaml_ng::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);

        let list: HealthCheckSpec =
            serde_yaml_ng::from_str("expected_statuses: [\"200-204\", 302]").unwrap();
        assert_eq!(
            list.expected_statuses,
            StatusRanges(vec![(200, 204), (302, 302)])
        );
        assert_eq!(list.path, "/");

        let unknown = serde_yaml_ng::from_str::<ClusterSpec>(
            "name: web\nendpoints: [{address: \"a:1\"}]\nbalanse: random\n",
        );
        assert!(unknown.unwrap_err().to_string().contains("balanse"));
        let bad_status = serde_yaml_ng::from_str::<HealthCheckSpec>("expected_statuses: \"2xx\"");
        assert!(bad_status
            .unwrap_err()
            .to_string()
            .contains("expected_statuses"));
    }

    #[test]
    fn validation_names_the_cluster_and_every_bad_field() {
        let mut s = spec(Balance::Random, &[1, 1, 1, 1, 1, 1]);
        s.endpoints[0].address = "10.0.0.9".into();
        s.endpoints[1].address = "10.0.0.3:80".into();
        s.endpoints[3].address = "::1:80".into();
        s.endpoints[4].address = "host:0".into();
        s.endpoints[5].weight = MAX_WEIGHT + 1;
        s.health_check = Some(HealthCheckSpec {
            path: "healthz".into(),
            timeout_ms: 6000,
            healthy_threshold: 0,
            expected_statuses: StatusRanges(vec![(399, 200)]),
            ..HealthCheckSpec::default()
        });
        s.outlier.max_ejection_ms = 10;
        s.outlier.max_ejection_percent = 101;
        s.retry.attempts = 0;
        s.request_timeout_ms = 0;
        let Err(ClusterError::Invalid(problems)) = Cluster::new(s) else {
            panic!("an invalid spec was accepted");
        };
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "endpoints[0].address",
                "endpoints[2].address",
                "endpoints[3].address",
                "endpoints[4].address",
                "endpoints[5].weight",
                "health_check.path",
                "health_check.timeout_ms",
                "health_check.healthy_threshold",
                "health_check.expected_statuses",
                "outlier.max_ejection_ms",
                "outlier.max_ejection_percent",
                "retry.attempts",
                "request_timeout_ms",
            ]
        );
        assert!(problems.iter().all(|p| p.cluster == "web"));
        assert_eq!(
            problems[0].to_string(),
            "cluster \"web\": endpoints[0].address: \"10.0.0.9\" has no port (want host:port)"
        );
        assert!(problems[1].reason.contains("listed twice"));

        let empty = ClusterSpec::new("bad name", vec![]);
        let err = empty.validate().unwrap_err().to_string();
        assert_eq!(
            err,
            "cluster \"bad name\": name: may hold only letters, digits, '.', '_' and '-'; \
             cluster \"bad name\": endpoints: needs at least one endpoint"
        );
    }
}
