//! The ALB's HTTP route table: which upstream cluster serves a request.
//!
//! Routes come from the ALB's YAML config ([`RouteSpec`]) and from the
//! contract's `UpdateRoutes` ([`RouteSpec::from_contract`]); both give the same
//! validated [`RouteTable`], an immutable value the data plane reads without
//! locks. [`RouteTable::find`] returns the first route, in table order, whose
//! host, path and headers all match the request.
//!
//! # Matching
//!
//! - **Host** (`hosts`; empty = any host, including a request with none): the
//!   request's `Host` / `:authority`. Names compare case-insensitively; a port,
//!   a trailing dot and `user@` are ignored, and `[::1]:8080` gives `::1`
//!   (DESIGN.md, "name patterns"). `*.example.com` matches any name ending in
//!   `.example.com` (one or more labels), never `example.com` itself.
//! - **Path** (`path`; default `prefix: "/"`), compared case-sensitively with
//!   the request path as sent, without the query and without percent-decoding
//!   or dot-segment removal: `prefix` is a plain string prefix (`/api` matches
//!   `/apix`; write `/api/` to match a segment), `exact` is equality, `regex`
//!   is an unanchored search (anchor it with `^` and `$`).
//! - **Headers** (`headers`): every listed header must be present (names
//!   case-insensitive) with exactly the listed value (one of its values, if
//!   sent several times); the value `*` means present with any value.
//!
//! # Order
//!
//! The table is sorted once, at build; the first matching route wins:
//!
//! 1. higher `priority` first;
//! 2. then the more specific host: an exact name over a wildcard over any
//!    host, and a longer wildcard suffix (`*.a.example.com`) over a shorter
//!    one (`*.example.com`);
//! 3. then the more specific path: `exact` over `prefix` over `regex`, and a
//!    longer prefix over a shorter one;
//! 4. then more header conditions over fewer;
//! 5. then `id` in byte order.
//!
//! A route with several hosts takes, for each request, the rank of the host
//! pattern that matched; [`RouteTable::specs`] lists routes by their most
//! specific host.
//!
//! # Cost of [`RouteTable::find`]
//!
//! No heap allocation: the host is normalized into a stack buffer. Then one
//! hash lookup for the exact name, one per dot in the name for wildcard
//! suffixes (longest first), and a scan of the candidate lists (routes for that
//! exact name, for each matching wildcard suffix, and for any host), each kept
//! in table order and cut short at the first match or as soon as it reaches a
//! route ranked below the best match found so far. So the cost does not grow
//! with the number of hosts in the table, only with the routes that share the
//! request's host (plus the any-host routes) ranked before the winner. Each
//! candidate costs a string compare or a regex search on the path (the regex
//! crate reuses its per-thread scratch space) and a header-map lookup per
//! header condition.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};
use shared_types::pb;

use crate::metrics::RouteMetrics;

/// The most routes one table holds.
pub const MAX_ROUTES: usize = 10_000;
/// The most host patterns one route holds.
pub const MAX_HOSTS_PER_ROUTE: usize = 1_000;
/// The longest host name (DNS's limit); a longer request host matches only
/// routes for any host.
pub const MAX_HOST_LEN: usize = 253;
/// The most memory one compiled path regex may take.
pub const REGEX_SIZE_LIMIT: usize = 256 * 1024;
/// The contract's `metadata` key that names a route's upstream cluster.
pub const UPSTREAM_KEY: &str = "upstream";
/// Where a route's hosts travel in the contract when there are several.
pub const HOSTS_KEY: &str = "hosts";

/// A route as configured: in the ALB's YAML `routes:` list, or converted from
/// the contract's `Route` message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Unique, non-empty.
    pub id: String,
    /// Exact names or `*.suffix` wildcards; empty matches any host.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// How the request path must match; `prefix: "/"` when left out.
    #[serde(default)]
    pub path: PathMatch,
    /// Header name (case-insensitive) to the required value; `*` = any value.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// 0 or more; higher is tried first.
    #[serde(default)]
    pub priority: i32,
    /// The upstream cluster the route sends to.
    pub cluster: String,
}

/// How a route matches the request path. Exactly one of the three; in YAML a
/// map with one key: `prefix: /api`, `exact: /health` or `regex: "^/v[0-9]+/"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PathMatchRepr", into = "PathMatchRepr")]
pub enum PathMatch {
    /// The path starts with this string.
    Prefix(String),
    /// The path is exactly this string.
    Exact(String),
    /// The regex finds a match anywhere in the path (use `^` to anchor).
    Regex(String),
}

/// The serde form of [`PathMatch`]: a map with exactly one of three keys (an
/// externally tagged enum would need YAML tags with serde_yaml_ng).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PathMatchRepr {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    regex: Option<String>,
}

impl TryFrom<PathMatchRepr> for PathMatch {
    type Error = &'static str;

    fn try_from(repr: PathMatchRepr) -> Result<Self, Self::Error> {
        match (repr.prefix, repr.exact, repr.regex) {
            (Some(p), None, None) => Ok(PathMatch::Prefix(p)),
            (None, Some(p), None) => Ok(PathMatch::Exact(p)),
            (None, None, Some(r)) => Ok(PathMatch::Regex(r)),
            _ => Err("path takes exactly one of prefix, exact or regex \
                      (e.g. path: { prefix: /api })"),
        }
    }
}

impl From<PathMatch> for PathMatchRepr {
    fn from(path: PathMatch) -> Self {
        let mut repr = PathMatchRepr {
            prefix: None,
            exact: None,
            regex: None,
        };
        match path {
            PathMatch::Prefix(p) => repr.prefix = Some(p),
            PathMatch::Exact(p) => repr.exact = Some(p),
            PathMatch::Regex(r) => repr.regex = Some(r),
        }
        repr
    }
}

impl Default for PathMatch {
    fn default() -> Self {
        PathMatch::Prefix("/".to_string())
    }
}

impl PathMatch {
    /// The contract's `path_pattern` syntax (nginx-like): `/x` is a prefix,
    /// `=/x` exact, `~re` a regex.
    pub fn to_pattern(&self) -> String {
        match self {
            PathMatch::Prefix(p) => p.clone(),
            PathMatch::Exact(p) => format!("={p}"),
            PathMatch::Regex(r) => format!("~{r}"),
        }
    }

    /// Parses the contract's `path_pattern`: empty or `/x` is a prefix, `=/x`
    /// exact, `~re` a regex. `None` for anything else.
    pub fn from_pattern(pattern: &str) -> Option<Self> {
        if pattern.is_empty() {
            Some(PathMatch::default())
        } else if let Some(exact) = pattern.strip_prefix('=') {
            Some(PathMatch::Exact(exact.to_string()))
        } else if let Some(regex) = pattern.strip_prefix('~') {
            Some(PathMatch::Regex(regex.to_string()))
        } else if pattern.starts_with('/') {
            Some(PathMatch::Prefix(pattern.to_string()))
        } else {
            None
        }
    }
}

/// A route or a table that cannot be used, and what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// One field of one route is wrong. `route` is the route id (or `#n`, the
    /// 1-based position, for a route without one).
    #[error("route {route}: {field} {problem}")]
    Invalid {
        route: String,
        field: String,
        problem: String,
    },
    /// More routes than [`MAX_ROUTES`].
    #[error(
        "routes: {count} routes is more than the limit of {max}; merge routes \
         that send to the same cluster (one route takes several hosts)"
    )]
    TooMany { count: usize, max: usize },
}

impl RouteError {
    fn invalid(route: &str, field: impl Into<String>, problem: impl Into<String>) -> Self {
        RouteError::Invalid {
            route: route.to_string(),
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// The id of the route at fault, if one route is.
    pub fn route(&self) -> Option<&str> {
        match self {
            RouteError::Invalid { route, .. } => Some(route),
            RouteError::TooMany { .. } => None,
        }
    }

    /// The field at fault (`path.regex`, `hosts[0]`, `headers["x-a"]`, ...).
    pub fn field(&self) -> &str {
        match self {
            RouteError::Invalid { field, .. } => field,
            RouteError::TooMany { .. } => "routes",
        }
    }
}

impl RouteSpec {
    /// Converts a route from the contract (`UpdateRoutes`).
    ///
    /// `route_id` is the id; `destination_pattern` the host (empty = any; a
    /// comma-separated list gives several, as [`RouteSpec::to_contract`] writes
    /// a route with several hosts); `path_pattern` is `/prefix` (or empty for
    /// `/`), `=/exact` or `~regex`; `headers` and `priority` as they are;
    /// `metadata["upstream"]` the cluster (required). `protocol` must be unset
    /// or one the ALB serves (http, https, http2, grpc, websocket).
    /// `source_pattern` and the ports are the NLB's business (DESIGN.md) and
    /// ignored here. The result is checked by [`RouteTable::build`].
    pub fn from_contract(route: &pb::Route) -> Result<RouteSpec, RouteError> {
        let id = route.route_id.as_str();
        let name = if id.is_empty() { "(no id)" } else { id };
        match pb::Protocol::try_from(route.protocol) {
            Ok(
                pb::Protocol::Unspecified
                | pb::Protocol::Http
                | pb::Protocol::Https
                | pb::Protocol::Http2
                | pb::Protocol::Grpc
                | pb::Protocol::Websocket,
            ) => {}
            Ok(other) => {
                return Err(RouteError::invalid(
                    name,
                    "protocol",
                    format!(
                        "{:?} is not served by the ALB; use http, https, http2, grpc or \
                         websocket, or leave it unset",
                        other.short_name()
                    ),
                ))
            }
            Err(_) => {
                return Err(RouteError::invalid(
                    name,
                    "protocol",
                    format!(
                        "{} is not a known protocol number; use http, https, http2, grpc \
                         or websocket, or leave it unset",
                        route.protocol
                    ),
                ))
            }
        }
        let path = PathMatch::from_pattern(&route.path_pattern).ok_or_else(|| {
            RouteError::invalid(
                name,
                "path_pattern",
                format!(
                    "{:?}: not a path pattern; use \"/prefix\", \"=/exact\" or \"~regex\"",
                    route.path_pattern
                ),
            )
        })?;
        let cluster = match route.metadata.get(UPSTREAM_KEY) {
            Some(c) if !c.trim().is_empty() => c.clone(),
            Some(_) => {
                return Err(RouteError::invalid(
                    name,
                    "metadata[\"upstream\"]",
                    "is empty; set it to the upstream cluster the route sends to",
                ))
            }
            None => {
                return Err(RouteError::invalid(
                    name,
                    "metadata[\"upstream\"]",
                    "is missing; set it to the upstream cluster the route sends to",
                ))
            }
        };
        // Several hosts travel in metadata["hosts"] (comma-separated): the
        // NLB takes one name pattern per route in destination_pattern.
        let dest = match route.metadata.get(HOSTS_KEY) {
            Some(list) => list.trim(),
            None => route.destination_pattern.trim(),
        };
        let hosts = if dest.is_empty() {
            Vec::new()
        } else {
            dest.split(',').map(|h| h.trim().to_string()).collect()
        };
        Ok(RouteSpec {
            id: route.route_id.clone(),
            hosts,
            path,
            headers: route
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            priority: route.priority,
            cluster,
        })
    }

    /// The route as the contract shows it (`GetRoutes`, and the routes the
    /// module announces to the NLB): protocol HTTP, one host in
    /// `destination_pattern`; several in `metadata["hosts"]` (comma-separated)
    /// with `destination_pattern` empty, since the NLB takes one name
    /// pattern per route (it then sends every host's traffic to the ALB,
    /// which routes it); the path in `path_pattern` syntax, the cluster in
    /// `metadata["upstream"]`.
    /// [`RouteSpec::from_contract`] gives back an equal spec.
    pub fn to_contract(&self) -> pb::Route {
        let mut metadata: std::collections::HashMap<String, String> =
            [(UPSTREAM_KEY.to_string(), self.cluster.clone())]
                .into_iter()
                .collect();
        let destination_pattern = match self.hosts.as_slice() {
            [one] => one.clone(),
            [] => String::new(),
            many => {
                metadata.insert(HOSTS_KEY.to_string(), many.join(","));
                String::new()
            }
        };
        pb::Route {
            route_id: self.id.clone(),
            protocol: pb::Protocol::Http as i32,
            destination_pattern,
            headers: self
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            path_pattern: self.path.to_pattern(),
            priority: self.priority,
            metadata,
            ..Default::default()
        }
    }
}

/// A compiled host pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum HostPattern {
    Any,
    /// A normalized exact name.
    Exact(Box<str>),
    /// `*.example.com`, kept as the suffix `.example.com`.
    Wildcard(Box<str>),
}

impl HostPattern {
    /// Specificity: exact over wildcard over any; a longer wildcard suffix
    /// over a shorter one. (Two exact names never match the same request.)
    fn rank(&self) -> (u8, usize) {
        match self {
            HostPattern::Any => (0, 0),
            HostPattern::Wildcard(s) => (1, s.len()),
            HostPattern::Exact(_) => (2, 0),
        }
    }
}

/// Drops `user@`, a port (`name:80`, `[::1]:80` gives `::1`; a bare IPv6
/// address keeps its colons) and trailing dots.
fn strip_host(name: &str) -> &str {
    let name = name.trim();
    let name = name.rsplit_once('@').map_or(name, |(_, host)| host);
    let name = if let Some(rest) = name.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(inside, _)| inside)
    } else {
        match name.split_once(':') {
            Some((host, port)) if !port.contains(':') => host,
            _ => name,
        }
    };
    name.trim_end_matches('.')
}

/// Normalizes a request host into `buf` without allocating: lowercase, no
/// port, no trailing dot. `None` for an empty or over-long name.
pub fn normalize_host<'b>(host: &str, buf: &'b mut [u8; MAX_HOST_LEN]) -> Option<&'b str> {
    let name = strip_host(host).as_bytes();
    if name.is_empty() || name.len() > MAX_HOST_LEN {
        return None;
    }
    let out = &mut buf[..name.len()];
    out.copy_from_slice(name);
    out.make_ascii_lowercase();
    std::str::from_utf8(out).ok()
}

fn parse_host(raw: &str) -> Result<HostPattern, String> {
    const FIX: &str = "use an exact name (api.example.com) or a wildcard (*.example.com)";
    if raw.is_empty() {
        return Err("is empty; leave hosts empty to match any host".to_string());
    }
    if raw.chars().any(char::is_whitespace) {
        return Err(format!("{raw:?}: contains whitespace; remove it"));
    }
    if raw.contains('@') {
        return Err(format!(
            "{raw:?}: the character '@' is not allowed in a host pattern; {FIX}"
        ));
    }
    let norm = strip_host(raw).to_ascii_lowercase();
    if norm == "*" || norm.is_empty() {
        return Err(format!(
            "{raw:?}: not a host pattern; leave hosts empty to match any host, or {FIX}"
        ));
    }
    let (wild, body) = match norm.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, norm.as_str()),
    };
    if body.contains('*') {
        return Err(format!(
            "{raw:?}: a * is allowed only as a leading \"*.\"; {FIX}"
        ));
    }
    if let Some(bad) = body
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':')))
    {
        return Err(format!(
            "{raw:?}: the character {bad:?} is not allowed in a host name (write \
             internationalized names in their xn-- form); {FIX}"
        ));
    }
    if body.split('.').any(str::is_empty) {
        return Err(format!(
            "{raw:?}: has an empty label (\"..\" or a leading dot); {FIX}"
        ));
    }
    if norm.len() > MAX_HOST_LEN {
        return Err(format!(
            "{raw:?}: is longer than {MAX_HOST_LEN} characters, the longest name DNS allows"
        ));
    }
    Ok(if wild {
        HostPattern::Wildcard(format!(".{body}").into())
    } else {
        HostPattern::Exact(body.into())
    })
}

#[derive(Debug, Clone)]
enum CompiledPath {
    Prefix(Box<str>),
    Exact(Box<str>),
    Regex(Regex),
}

impl CompiledPath {
    fn matches(&self, path: &str) -> bool {
        match self {
            CompiledPath::Prefix(p) => path.starts_with(&**p),
            CompiledPath::Exact(p) => path == &**p,
            CompiledPath::Regex(re) => re.is_match(path),
        }
    }

    /// Specificity: exact over prefix over regex; a longer prefix first.
    fn rank(&self) -> (u8, usize) {
        match self {
            CompiledPath::Regex(_) => (0, 0),
            CompiledPath::Prefix(p) => (1, p.len()),
            CompiledPath::Exact(_) => (2, 0),
        }
    }
}

fn check_literal_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?}: must start with \"/\""));
    }
    if let Some(bad) = path.chars().find(|c| matches!(c, '?' | '#')) {
        return Err(format!(
            "{path:?}: contains {bad:?}, but paths are matched without the query; \
             remove it and what follows"
        ));
    }
    if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{path:?}: contains whitespace or a control character, which never \
             appears in a request path; percent-encode it (%20)"
        ));
    }
    Ok(())
}

fn compile_path(path: &PathMatch) -> Result<CompiledPath, (&'static str, String)> {
    match path {
        PathMatch::Prefix(p) => check_literal_path(p)
            .map(|()| CompiledPath::Prefix(p.as_str().into()))
            .map_err(|e| ("path.prefix", e)),
        PathMatch::Exact(p) => check_literal_path(p)
            .map(|()| CompiledPath::Exact(p.as_str().into()))
            .map_err(|e| ("path.exact", e)),
        PathMatch::Regex(r) => RegexBuilder::new(r)
            .size_limit(REGEX_SIZE_LIMIT)
            .dfa_size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map(CompiledPath::Regex)
            .map_err(|e| ("path.regex", format!("{r:?}: {}", regex_problem(&e)))),
    }
}

/// The regex crate's error in one line, with what to do.
fn regex_problem(err: &regex::Error) -> String {
    match err {
        regex::Error::Syntax(text) => {
            let what = text
                .lines()
                .rev()
                .find_map(|l| l.trim().strip_prefix("error: "))
                .map_or_else(|| text.replace('\n', " "), str::to_string);
            format!("{what}; fix the pattern (syntax: https://docs.rs/regex/#syntax)")
        }
        regex::Error::CompiledTooBig(limit) => format!(
            "compiles to more than the limit of {limit} bytes; simplify it, or use a \
             prefix or exact path"
        ),
        other => other.to_string().replace('\n', " "),
    }
}

type HeaderCondition = (HeaderName, Option<HeaderValue>);

/// Table order: priority, host, path, header count (all descending), id.
type SortKey<'a> = (
    Reverse<i32>,
    Reverse<(u8, usize)>,
    Reverse<(u8, usize)>,
    Reverse<usize>,
    &'a str,
);

fn compile_headers(
    route: &str,
    headers: &BTreeMap<String, String>,
) -> Result<Vec<HeaderCondition>, RouteError> {
    let mut out: Vec<HeaderCondition> = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        let field = format!("headers[{name:?}]");
        let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            RouteError::invalid(
                route,
                &field,
                "is not a valid header name; use letters, digits and - (e.g. x-canary)",
            )
        })?;
        if out.iter().any(|(seen, _)| *seen == header) {
            return Err(RouteError::invalid(
                route,
                &field,
                format!(
                    "names the header {:?} twice (names are case-insensitive); keep one",
                    header.as_str()
                ),
            ));
        }
        let want = if value == "*" {
            None
        } else {
            if value.trim() != value {
                return Err(RouteError::invalid(
                    route,
                    &field,
                    format!(
                        "value {value:?} has leading or trailing whitespace, which \
                         requests never carry; remove it"
                    ),
                ));
            }
            let v = HeaderValue::from_str(value).map_err(|_| {
                RouteError::invalid(
                    route,
                    &field,
                    format!(
                        "value {value:?} has characters a header value cannot hold; \
                         use visible ASCII"
                    ),
                )
            })?;
            Some(v)
        };
        out.push((header, want));
    }
    Ok(out)
}

/// A validated route in a [`RouteTable`].
#[derive(Debug, Clone)]
pub struct Route {
    spec: RouteSpec,
    /// The id and the cluster, shared: a request keeps them for its log
    /// line without copying them.
    shared_id: Arc<str>,
    shared_cluster: Arc<str>,
    /// Normalized and deduplicated; `[Any]` when the spec lists no host.
    hosts: Vec<HostPattern>,
    path: CompiledPath,
    headers: Vec<HeaderCondition>,
    /// The route's metric series, set once the metrics are registered:
    /// a request records into them without looking them up by name.
    metrics: OnceLock<Arc<RouteMetrics>>,
}

impl Route {
    fn compile(spec: RouteSpec) -> Result<Route, RouteError> {
        let id = spec.id.as_str();
        if spec.hosts.len() > MAX_HOSTS_PER_ROUTE {
            return Err(RouteError::invalid(
                id,
                "hosts",
                format!(
                    "lists {} hosts, more than the limit of {MAX_HOSTS_PER_ROUTE}; use a \
                     wildcard (*.example.com) or split the route",
                    spec.hosts.len()
                ),
            ));
        }
        let mut hosts = Vec::with_capacity(spec.hosts.len().max(1));
        for (i, raw) in spec.hosts.iter().enumerate() {
            let pattern =
                parse_host(raw).map_err(|p| RouteError::invalid(id, format!("hosts[{i}]"), p))?;
            if !hosts.contains(&pattern) {
                hosts.push(pattern);
            }
        }
        if hosts.is_empty() {
            hosts.push(HostPattern::Any);
        }
        let path = compile_path(&spec.path).map_err(|(f, p)| RouteError::invalid(id, f, p))?;
        let headers = compile_headers(id, &spec.headers)?;
        if spec.priority < 0 {
            return Err(RouteError::invalid(
                id,
                "priority",
                format!("{} is negative; use 0 (the lowest) or more", spec.priority),
            ));
        }
        if spec.cluster.trim().is_empty() {
            return Err(RouteError::invalid(
                id,
                "cluster",
                "is empty; name the upstream cluster the route sends to",
            ));
        }
        Ok(Route {
            shared_id: Arc::from(spec.id.as_str()),
            shared_cluster: Arc::from(spec.cluster.as_str()),
            spec,
            hosts,
            path,
            headers,
            metrics: OnceLock::new(),
        })
    }

    /// The route's id.
    pub fn id(&self) -> &str {
        &self.spec.id
    }

    /// The upstream cluster the route sends to.
    pub fn cluster(&self) -> &str {
        &self.spec.cluster
    }

    /// [`id`](Self::id), shared.
    pub fn shared_id(&self) -> &Arc<str> {
        &self.shared_id
    }

    /// [`cluster`](Self::cluster), shared.
    pub fn shared_cluster(&self) -> &Arc<str> {
        &self.shared_cluster
    }

    /// The route's metric series, once set.
    pub fn metrics(&self) -> Option<&Arc<RouteMetrics>> {
        self.metrics.get()
    }

    /// Sets the route's metric series (the first one set stays).
    pub fn set_metrics(&self, metrics: Arc<RouteMetrics>) {
        let _ = self.metrics.set(metrics);
    }

    /// The route as configured.
    pub fn spec(&self) -> &RouteSpec {
        &self.spec
    }

    /// Path and headers (the host is matched by the table's index).
    fn matches_rest(&self, path: &str, headers: &HeaderMap) -> bool {
        self.path.matches(path)
            && self.headers.iter().all(|(name, want)| match want {
                None => headers.contains_key(name),
                Some(want) => headers.get_all(name).iter().any(|v| v == want),
            })
    }

    /// The sort key of this route under one of its host patterns.
    fn key<'a>(&'a self, host: &HostPattern) -> SortKey<'a> {
        (
            Reverse(self.spec.priority),
            Reverse(host.rank()),
            Reverse(self.path.rank()),
            Reverse(self.headers.len()),
            self.spec.id.as_str(),
        )
    }

    fn best_host(&self) -> &HostPattern {
        self.hosts
            .iter()
            .max_by_key(|h| h.rank())
            .unwrap_or(&HostPattern::Any)
    }
}

/// A validated, ordered set of routes, indexed by host. Immutable: build a new
/// one to change it.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    /// In table order (see the module docs).
    routes: Vec<Route>,
    /// One entry per (route, host pattern), in match order: entry rank to
    /// route index.
    entries: Vec<u32>,
    /// Normalized exact name to entry ranks, ascending.
    exact: HashMap<Box<str>, Vec<u32>>,
    /// Wildcard suffix (`.example.com`) to entry ranks, ascending.
    wildcard: HashMap<Box<str>, Vec<u32>>,
    /// Entry ranks of routes for any host, ascending.
    any: Vec<u32>,
}

impl RouteTable {
    /// Validates the routes and orders them. The error names the route and
    /// the field, and says what to change.
    pub fn build(specs: Vec<RouteSpec>) -> Result<RouteTable, RouteError> {
        if specs.len() > MAX_ROUTES {
            return Err(RouteError::TooMany {
                count: specs.len(),
                max: MAX_ROUTES,
            });
        }
        let mut seen: HashMap<&str, usize> = HashMap::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            if spec.id.is_empty() {
                return Err(RouteError::invalid(
                    &format!("#{}", i + 1),
                    "id",
                    "is empty; give every route a unique id",
                ));
            }
            if let Some(first) = seen.insert(&spec.id, i) {
                return Err(RouteError::invalid(
                    &spec.id,
                    "id",
                    format!(
                        "is used by routes #{} and #{}; give every route a unique id",
                        first + 1,
                        i + 1
                    ),
                ));
            }
        }
        let mut routes = specs
            .into_iter()
            .map(Route::compile)
            .collect::<Result<Vec<_>, _>>()?;
        routes.sort_by(|a, b| a.key(a.best_host()).cmp(&b.key(b.best_host())));

        let mut entries: Vec<(usize, usize)> = routes
            .iter()
            .enumerate()
            .flat_map(|(r, route)| (0..route.hosts.len()).map(move |h| (r, h)))
            .collect();
        entries.sort_by(|&(ra, ha), &(rb, hb)| {
            let (a, b) = (&routes[ra], &routes[rb]);
            a.key(&a.hosts[ha])
                .cmp(&b.key(&b.hosts[hb]))
                .then((ra, ha).cmp(&(rb, hb)))
        });

        let mut table = RouteTable {
            entries: Vec::with_capacity(entries.len()),
            ..RouteTable::default()
        };
        for (rank, &(r, h)) in entries.iter().enumerate() {
            // At most MAX_ROUTES * MAX_HOSTS_PER_ROUTE entries: fits in u32.
            let (rank, r32) = (rank as u32, r as u32);
            table.entries.push(r32);
            match &routes[r].hosts[h] {
                HostPattern::Any => table.any.push(rank),
                HostPattern::Exact(name) => table.exact.entry(name.clone()).or_default().push(rank),
                HostPattern::Wildcard(suffix) => {
                    table.wildcard.entry(suffix.clone()).or_default().push(rank)
                }
            }
        }
        table.routes = routes;
        Ok(table)
    }

    /// The first route, in table order, that matches the request. `host` is
    /// the `Host` header or `:authority` as received (normalized here); `path`
    /// is the request path without the query. Allocates nothing; see the
    /// module docs for the cost.
    pub fn find(&self, host: Option<&str>, path: &str, headers: &HeaderMap) -> Option<&Route> {
        let mut buf = [0u8; MAX_HOST_LEN];
        // A table whose routes all match any host needs no host.
        let host = if self.exact.is_empty() && self.wildcard.is_empty() {
            None
        } else {
            host.and_then(|h| normalize_host(h, &mut buf))
        };
        let mut best = u32::MAX;
        if let Some(name) = host {
            if let Some(list) = self.exact.get(name) {
                self.scan(list, path, headers, &mut best);
            }
            if !self.wildcard.is_empty() {
                // Suffixes at each dot but a leading one, longest first: the
                // name must have at least one label before the suffix.
                for (i, b) in name.bytes().enumerate().skip(1) {
                    if b == b'.' {
                        if let Some(list) = name.get(i..).and_then(|s| self.wildcard.get(s)) {
                            self.scan(list, path, headers, &mut best);
                        }
                    }
                }
            }
        }
        self.scan(&self.any, path, headers, &mut best);
        let route = *self.entries.get(best as usize)?;
        self.routes.get(route as usize)
    }

    /// Lowers `best` to the first rank in `list` (ascending) below it whose
    /// route matches.
    fn scan(&self, list: &[u32], path: &str, headers: &HeaderMap, best: &mut u32) {
        for &rank in list {
            if rank >= *best {
                return;
            }
            let route = self
                .entries
                .get(rank as usize)
                .and_then(|&r| self.routes.get(r as usize));
            if route.is_some_and(|r| r.matches_rest(path, headers)) {
                *best = rank;
                return;
            }
        }
    }

    /// The routes in table order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The specs in table order (for `GetRoutes` and config dumps).
    pub fn specs(&self) -> Vec<RouteSpec> {
        self.routes.iter().map(|r| r.spec.clone()).collect()
    }

    /// How many routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether there are no routes (every request then finds none).
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, cluster: &str) -> RouteSpec {
        RouteSpec {
            id: id.to_string(),
            hosts: Vec::new(),
            path: PathMatch::default(),
            headers: BTreeMap::new(),
            priority: 0,
            cluster: cluster.to_string(),
        }
    }

    fn hosts(mut s: RouteSpec, hosts: &[&str]) -> RouteSpec {
        s.hosts = hosts.iter().map(|h| h.to_string()).collect();
        s
    }

    fn path(mut s: RouteSpec, p: PathMatch) -> RouteSpec {
        s.path = p;
        s
    }

    fn header(mut s: RouteSpec, name: &str, value: &str) -> RouteSpec {
        s.headers.insert(name.to_string(), value.to_string());
        s
    }

    fn prio(mut s: RouteSpec, p: i32) -> RouteSpec {
        s.priority = p;
        s
    }

    fn prefix(p: &str) -> PathMatch {
        PathMatch::Prefix(p.to_string())
    }
    fn exact(p: &str) -> PathMatch {
        PathMatch::Exact(p.to_string())
    }
    fn regex(p: &str) -> PathMatch {
        PathMatch::Regex(p.to_string())
    }

    fn table(specs: Vec<RouteSpec>) -> RouteTable {
        RouteTable::build(specs).expect("valid routes")
    }

    fn hmap(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    fn find<'t>(t: &'t RouteTable, host: Option<&str>, path: &str) -> Option<&'t str> {
        t.find(host, path, &HeaderMap::new()).map(Route::id)
    }

    #[test]
    fn each_match_kind() {
        let t = table(vec![
            path(spec("exact", "c-exact"), exact("/health")),
            path(spec("prefix", "c-prefix"), prefix("/api/")),
            path(spec("regex", "c-regex"), regex("^/v[0-9]+/")),
            hosts(spec("host", "c-host"), &["www.example.com"]),
            hosts(spec("wild", "c-wild"), &["*.example.com"]),
        ]);
        let hit = t.find(None, "/health", &HeaderMap::new()).unwrap();
        assert_eq!((hit.id(), hit.cluster()), ("exact", "c-exact"));
        assert_eq!(hit.spec().path, exact("/health"));
        assert_eq!(find(&t, None, "/health/x"), None);
        assert_eq!(find(&t, None, "/api/users"), Some("prefix"));
        assert_eq!(find(&t, None, "/api"), None);
        assert_eq!(find(&t, None, "/v2/things"), Some("regex"));
        assert_eq!(find(&t, None, "/x/v2/things"), None);
        assert_eq!(find(&t, Some("www.example.com"), "/"), Some("host"));
        assert_eq!(find(&t, Some("img.example.com"), "/"), Some("wild"));
        assert_eq!(find(&t, Some("other.org"), "/"), None);
        assert_eq!(find(&t, None, "/"), None);
    }

    #[test]
    fn default_route_matches_everything() {
        let t = table(vec![spec("all", "c")]);
        for host in [None, Some(""), Some("a.b"), Some("\u{0}\u{ff}")] {
            assert_eq!(find(&t, host, "/anything"), Some("all"));
        }
        assert_eq!(find(&t, Some("x"), ""), None, "a prefix \"/\" needs a /");
    }

    #[test]
    fn host_normalization() {
        let t = table(vec![
            hosts(spec("name", "c"), &["API.Example.COM."]),
            hosts(spec("v6", "c"), &["[::1]:8443"]),
            hosts(spec("v4", "c"), &["10.0.0.1"]),
        ]);
        assert_eq!(
            t.routes()[0].hosts,
            [HostPattern::Exact("api.example.com".into())]
        );
        let cases = [
            ("api.example.com", Some("name")),
            ("API.EXAMPLE.COM", Some("name")),
            ("Api.Example.Com:8080", Some("name")),
            ("api.example.com.", Some("name")),
            ("api.example.com.:443", Some("name")),
            ("  api.example.com  ", Some("name")),
            ("user@api.example.com:80", Some("name")),
            ("api.example.co", None),
            ("xapi.example.com", None),
            ("[::1]:8080", Some("v6")),
            ("[::1]", Some("v6")),
            ("::1", Some("v6")),
            ("[::1", Some("v6")),
            ("::2", None),
            ("10.0.0.1:80", Some("v4")),
            ("10.0.0.1", Some("v4")),
        ];
        for (host, want) in cases {
            assert_eq!(find(&t, Some(host), "/"), want, "host {host:?}");
        }
    }

    #[test]
    fn wildcard_matches_labels_below_not_the_apex() {
        let t = table(vec![hosts(spec("w", "c"), &["*.Example.com"])]);
        for (host, want) in [
            ("a.example.com", true),
            ("a.b.c.example.com", true),
            ("A.EXAMPLE.COM.:443", true),
            ("example.com", false),
            ("Example.com.", false),
            (".example.com", false),
            ("aexample.com", false),
            ("example.com.evil.org", false),
            ("com", false),
        ] {
            assert_eq!(find(&t, Some(host), "/").is_some(), want, "host {host:?}");
        }
        assert_eq!(find(&t, None, "/"), None);
    }

    #[test]
    fn precedence() {
        // (routes, host, path, headers, expected winner)
        type Case = (
            Vec<RouteSpec>,
            &'static str,
            &'static str,
            Vec<(&'static str, &'static str)>,
            &'static str,
        );
        let cases: Vec<Case> = vec![
            // priority beats every specificity
            (
                vec![
                    hosts(path(spec("specific", "c"), exact("/a")), &["a.example.com"]),
                    prio(spec("broad", "c"), 5),
                ],
                "a.example.com",
                "/a",
                vec![],
                "broad",
            ),
            // exact host over wildcard over any
            (
                vec![
                    spec("any", "c"),
                    hosts(spec("wild", "c"), &["*.example.com"]),
                    hosts(spec("exact", "c"), &["a.example.com"]),
                ],
                "a.example.com",
                "/",
                vec![],
                "exact",
            ),
            (
                vec![
                    spec("any", "c"),
                    hosts(spec("wild", "c"), &["*.example.com"]),
                ],
                "b.example.com",
                "/",
                vec![],
                "wild",
            ),
            // longer wildcard suffix first
            (
                vec![
                    hosts(spec("short", "c"), &["*.example.com"]),
                    hosts(spec("long", "c"), &["*.b.example.com"]),
                ],
                "a.b.example.com",
                "/",
                vec![],
                "long",
            ),
            // host specificity beats path specificity
            (
                vec![
                    path(spec("any-exact-path", "c"), exact("/a")),
                    hosts(spec("wild-root", "c"), &["*.example.com"]),
                ],
                "x.example.com",
                "/a",
                vec![],
                "wild-root",
            ),
            // exact path over prefix over regex
            (
                vec![
                    path(spec("re", "c"), regex("^/a")),
                    path(spec("pre", "c"), prefix("/a")),
                    path(spec("ex", "c"), exact("/a")),
                ],
                "h",
                "/a",
                vec![],
                "ex",
            ),
            (
                vec![
                    path(spec("re", "c"), regex("^/a")),
                    path(spec("pre", "c"), prefix("/")),
                ],
                "h",
                "/a",
                vec![],
                "pre",
            ),
            // longer prefix first
            (
                vec![
                    path(spec("a", "c"), prefix("/api")),
                    path(spec("b", "c"), prefix("/api/v1")),
                ],
                "h",
                "/api/v1/x",
                vec![],
                "b",
            ),
            // path specificity beats header count
            (
                vec![
                    header(path(spec("hdr", "c"), prefix("/")), "x-a", "*"),
                    path(spec("longer", "c"), prefix("/z")),
                ],
                "h",
                "/z",
                vec![("x-a", "1")],
                "longer",
            ),
            // more headers first
            (
                vec![
                    header(spec("one", "c"), "x-a", "1"),
                    header(header(spec("two", "c"), "x-a", "1"), "x-b", "*"),
                ],
                "h",
                "/",
                vec![("x-a", "1"), ("x-b", "2")],
                "two",
            ),
            // falls through to less specific when the specific one fails
            (
                vec![
                    header(header(spec("two", "c"), "x-a", "1"), "x-b", "*"),
                    header(spec("one", "c"), "x-a", "1"),
                ],
                "h",
                "/",
                vec![("x-a", "1")],
                "one",
            ),
            // then id order
            (
                vec![spec("b", "c"), spec("a", "c"), spec("c", "c")],
                "h",
                "/",
                vec![],
                "a",
            ),
            (
                vec![
                    hosts(spec("zz", "c"), &["*.example.com"]),
                    hosts(spec("aa", "c"), &["*.example.com"]),
                ],
                "q.example.com",
                "/",
                vec![],
                "aa",
            ),
            // a route with several hosts ranks by the host that matched
            (
                vec![
                    hosts(spec("multi", "c"), &["*.example.com", "a.example.com"]),
                    hosts(spec("single", "c"), &["*.a.example.com", "b.example.com"]),
                ],
                "x.a.example.com",
                "/",
                vec![],
                "single",
            ),
            (
                vec![
                    hosts(spec("multi", "c"), &["*.example.com", "a.example.com"]),
                    hosts(spec("single", "c"), &["*.a.example.com"]),
                ],
                "a.example.com",
                "/",
                vec![],
                "multi",
            ),
            // a high-priority any-host route beats an exact host
            (
                vec![
                    hosts(prio(spec("exact", "c"), 1), &["a.example.com"]),
                    prio(spec("any", "c"), 2),
                ],
                "a.example.com",
                "/",
                vec![],
                "any",
            ),
        ];
        for (i, (specs, host, p, hdrs, want)) in cases.into_iter().enumerate() {
            // Input order must not matter.
            for specs in [specs.clone(), specs.into_iter().rev().collect()] {
                let t = table(specs);
                let got = t.find(Some(host), p, &hmap(&hdrs)).map(Route::id);
                assert_eq!(got, Some(want), "case {i}: {host} {p} {hdrs:?}");
            }
        }
    }

    #[test]
    fn specs_in_documented_order() {
        let t = table(vec![
            spec("any-root", "c"),
            path(spec("any-exact", "c"), exact("/x")),
            path(spec("any-regex", "c"), regex("x")),
            path(spec("any-long", "c"), prefix("/long")),
            header(spec("any-hdr", "c"), "x", "*"),
            hosts(spec("wild-short", "c"), &["*.com"]),
            hosts(spec("wild-long", "c"), &["*.example.com"]),
            hosts(spec("exact-b", "c"), &["b.com"]),
            hosts(spec("exact-a", "c"), &["z.com"]),
            hosts(spec("mixed", "c"), &["*.org", "a.org"]),
            prio(spec("high", "c"), 9),
        ]);
        let ids: Vec<String> = t.specs().into_iter().map(|s| s.id).collect();
        assert_eq!(
            ids,
            [
                "high",
                "exact-a",
                "exact-b",
                "mixed",
                "wild-long",
                "wild-short",
                "any-exact",
                "any-long",
                "any-hdr",
                "any-root",
                "any-regex",
            ]
        );
        assert_eq!(t.len(), 11);
        assert!(!t.is_empty());
        assert!(RouteTable::default().is_empty());
        assert_eq!(RouteTable::build(vec![]).unwrap().len(), 0);
    }

    #[test]
    fn header_matching() {
        let t = table(vec![
            header(header(spec("both", "c"), "X-Canary", "yes"), "x-team", "*"),
            header(prio(spec("never", "c"), 0), "x-never", "1"),
        ]);
        let cases: [(&[(&str, &str)], bool); 7] = [
            (&[("x-canary", "yes"), ("x-team", "a")], true),
            (&[("X-CANARY", "yes"), ("X-Team", "")], true),
            (&[("x-canary", "yes")], false),
            (&[("x-canary", "Yes"), ("x-team", "a")], false),
            (
                &[("x-canary", "no"), ("x-canary", "yes"), ("x-team", "a")],
                true,
            ),
            (&[("x-canary", "yes "), ("x-team", "a")], false),
            (&[], false),
        ];
        for (hdrs, want) in cases {
            let got = t.find(Some("h"), "/", &hmap(hdrs)).map(Route::id);
            assert_eq!(got == Some("both"), want, "{hdrs:?}");
        }
    }

    #[test]
    fn regex_paths() {
        let t = table(vec![
            path(spec("anchored", "c"), regex(r"^/v[0-9]+/users/[0-9]+$")),
            path(spec("unanchored", "c"), regex(r"\.(png|jpg)")),
        ]);
        assert_eq!(find(&t, None, "/v2/users/17"), Some("anchored"));
        assert_eq!(find(&t, None, "/v2/users/17/x"), None);
        assert_eq!(find(&t, None, "/img/a.png"), Some("unanchored"));
        assert_eq!(find(&t, None, "/img/a.gif"), None);
    }

    #[test]
    fn contract_round_trip_and_path_syntax() {
        let specs = [
            spec("plain", "web"),
            header(
                prio(
                    hosts(path(spec("full", "api"), exact("/h")), &["*.example.com"]),
                    7,
                ),
                "X-A",
                "*",
            ),
            path(
                hosts(spec("multi", "c"), &["a.com", "b.com"]),
                regex("^/v[0-9]+/"),
            ),
            path(spec("pre", "c"), prefix("/api")),
        ];
        for s in specs {
            let pb = s.to_contract();
            assert_eq!(pb.protocol, pb::Protocol::Http as i32);
            assert_eq!(pb.metadata.get("upstream"), Some(&s.cluster));
            assert_eq!(RouteSpec::from_contract(&pb).unwrap(), s);
        }
        assert_eq!(spec("x", "c").to_contract().path_pattern, "/");

        let from = |pattern: &str| {
            let mut r = spec("r", "up").to_contract();
            r.path_pattern = pattern.to_string();
            RouteSpec::from_contract(&r).map(|s| s.path)
        };
        assert_eq!(from(""), Ok(prefix("/")));
        assert_eq!(from("/api"), Ok(prefix("/api")));
        assert_eq!(from("=/health"), Ok(exact("/health")));
        assert_eq!(from("~^/v[0-9]+/"), Ok(regex("^/v[0-9]+/")));
        let err = from("api").unwrap_err();
        assert_eq!((err.route(), err.field()), (Some("r"), "path_pattern"));

        let pb = pb::Route {
            route_id: "c1".into(),
            destination_pattern: "Shop.Example.com".into(),
            source_pattern: "10.0.0.0/8".into(),
            destination_port: 443,
            priority: 3,
            headers: [("x-a".to_string(), "1".to_string())].into_iter().collect(),
            metadata: [("upstream".to_string(), "shop".to_string())]
                .into_iter()
                .collect(),
            ..Default::default()
        };
        let s = RouteSpec::from_contract(&pb).unwrap();
        assert_eq!(s.hosts, ["Shop.Example.com"]);
        assert_eq!((s.priority, s.cluster.as_str()), (3, "shop"));
        assert_eq!(s.path, prefix("/"));
        let t = table(vec![s]);
        let hit = t.find(Some("shop.example.com:443"), "/", &hmap(&[("x-a", "1")]));
        assert_eq!(hit.map(Route::cluster), Some("shop"));

        let mut missing = pb.clone();
        missing.metadata.clear();
        let err = RouteSpec::from_contract(&missing).unwrap_err();
        assert_eq!(
            (err.route(), err.field()),
            (Some("c1"), "metadata[\"upstream\"]")
        );
        assert!(err.to_string().contains("upstream"), "{err}");

        let mut tcp = pb.clone();
        tcp.protocol = pb::Protocol::Postgres as i32;
        let err = RouteSpec::from_contract(&tcp).unwrap_err();
        assert_eq!(err.field(), "protocol");
        assert!(err.to_string().contains("postgres"), "{err}");
        tcp.protocol = 999;
        assert_eq!(
            RouteSpec::from_contract(&tcp).unwrap_err().field(),
            "protocol"
        );
        tcp.protocol = pb::Protocol::Grpc as i32;
        assert!(RouteSpec::from_contract(&tcp).is_ok());
    }

    #[test]
    fn yaml_spec() {
        let yaml = r#"
- id: api
  hosts: ["api.example.com", "*.api.example.com"]
  path: { prefix: /api }
  headers: { X-Canary: "yes" }
  priority: 2
  cluster: api-v2
- id: health
  path: { exact: /health }
  cluster: ops
- id: versioned
  path:
    regex: "^/v[0-9]+/"
  cluster: legacy
- id: default
  cluster: web
"#;
        let specs: Vec<RouteSpec> = serde_yaml_ng::from_str(yaml).unwrap();
        assert_eq!(specs[0].path, prefix("/api"));
        assert_eq!(specs[1].path, exact("/health"));
        assert_eq!(specs[2].path, regex("^/v[0-9]+/"));
        assert_eq!(specs[3], spec("default", "web"));
        let t = table(specs);
        assert_eq!(t.len(), 4);

        for bad in [
            "id: a\ncluster: c\nextra: 1\n",
            "id: a\ncluster: c\npath: { prefix: /a, exact: /b }\n",
            "id: a\ncluster: c\npath: { glob: /a }\n",
            "id: a\ncluster: c\npath: {}\n",
            "id: a\n",
        ] {
            assert!(serde_yaml_ng::from_str::<RouteSpec>(bad).is_err(), "{bad}");
        }
        let err = serde_yaml_ng::from_str::<RouteSpec>("id: a\ncluster: c\npath: {}\n");
        assert!(err.unwrap_err().to_string().contains("exactly one"));

        // Serializes back to the same shape.
        let back: Vec<RouteSpec> =
            serde_yaml_ng::from_str(&serde_yaml_ng::to_string(&t.specs()).unwrap()).unwrap();
        assert_eq!(back, t.specs());
    }

    #[test]
    fn validation_errors_name_route_and_field() {
        let cases: Vec<(RouteSpec, &str, &str)> = vec![
            (
                hosts(spec("h", "c"), &[""]),
                "hosts[0]",
                "leave hosts empty",
            ),
            (
                hosts(spec("h", "c"), &["a.com", "a..b.com"]),
                "hosts[1]",
                "empty label",
            ),
            (
                hosts(spec("h", "c"), &[".a.com"]),
                "hosts[0]",
                "empty label",
            ),
            (
                hosts(spec("h", "c"), &["*"]),
                "hosts[0]",
                "leave hosts empty",
            ),
            (
                hosts(spec("h", "c"), &["*."]),
                "hosts[0]",
                "leave hosts empty",
            ),
            (
                hosts(spec("h", "c"), &["a.*.com"]),
                "hosts[0]",
                "leading \"*.\"",
            ),
            (hosts(spec("h", "c"), &["**.a.com"]), "hosts[0]", "leading"),
            (hosts(spec("h", "c"), &["*a.com"]), "hosts[0]", "leading"),
            (hosts(spec("h", "c"), &["a .com"]), "hosts[0]", "whitespace"),
            (hosts(spec("h", "c"), &[" a.com"]), "hosts[0]", "whitespace"),
            (hosts(spec("h", "c"), &["a/b.com"]), "hosts[0]", "'/'"),
            (hosts(spec("h", "c"), &["u@b.com"]), "hosts[0]", "'@'"),
            (hosts(spec("h", "c"), &["bücher.de"]), "hosts[0]", "xn--"),
            (
                hosts(spec("h", "c"), &[&"a".repeat(254)]),
                "hosts[0]",
                "253",
            ),
            (
                path(spec("p", "c"), prefix("api")),
                "path.prefix",
                "start with",
            ),
            (
                path(spec("p", "c"), prefix("")),
                "path.prefix",
                "start with",
            ),
            (
                path(spec("p", "c"), exact("health")),
                "path.exact",
                "start with",
            ),
            (path(spec("p", "c"), exact("/a?b=1")), "path.exact", "query"),
            (path(spec("p", "c"), prefix("/a b")), "path.prefix", "%20"),
            (
                path(spec("api", "c"), regex("(")),
                "path.regex",
                "unclosed group",
            ),
            (path(spec("p", "c"), regex("a{100000}")), "path.regex", ""),
            (
                path(spec("p", "c"), regex(r"\w{1000}\w{1000}")),
                "path.regex",
                "limit",
            ),
            (
                header(spec("hd", "c"), "bad name", "1"),
                "headers[\"bad name\"]",
                "header name",
            ),
            (
                header(spec("hd", "c"), "", "1"),
                "headers[\"\"]",
                "header name",
            ),
            (
                header(header(spec("hd", "c"), "X-A", "1"), "x-a", "2"),
                "headers[\"x-a\"]",
                "twice",
            ),
            (
                header(spec("hd", "c"), "x-a", "a\nb"),
                "headers[\"x-a\"]",
                "visible ASCII",
            ),
            (
                header(spec("hd", "c"), "x-a", " a"),
                "headers[\"x-a\"]",
                "whitespace",
            ),
            (prio(spec("pr", "c"), -1), "priority", "negative"),
            (spec("cl", ""), "cluster", "empty"),
            (spec("cl", "  "), "cluster", "empty"),
        ];
        for (s, field, text) in cases {
            let id = s.id.clone();
            let err = RouteTable::build(vec![spec("ok", "c"), s]).unwrap_err();
            let msg = err.to_string();
            assert_eq!(err.route(), Some(id.as_str()), "{msg}");
            assert_eq!(err.field(), field, "{msg}");
            assert!(msg.starts_with(&format!("route {id}: {field} ")), "{msg}");
            assert!(msg.contains(text), "{msg} lacks {text:?}");
            assert!(!msg.contains('\n'), "one line: {msg}");
        }

        let err = RouteTable::build(vec![path(spec("api", "c"), regex("("))]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("route api: path.regex \"(\": unclosed group; "),
            "{err}"
        );

        let err = RouteTable::build(vec![spec("a", "c"), spec("", "c")]).unwrap_err();
        assert_eq!((err.route(), err.field()), (Some("#2"), "id"));
        let err =
            RouteTable::build(vec![spec("a", "c"), spec("b", "c"), spec("a", "d")]).unwrap_err();
        assert_eq!((err.route(), err.field()), (Some("a"), "id"));
        assert!(err.to_string().contains("#1 and #3"), "{err}");

        let many: Vec<String> = (0..=MAX_HOSTS_PER_ROUTE)
            .map(|i| format!("h{i}.com"))
            .collect();
        let mut s = spec("big", "c");
        s.hosts = many;
        let err = RouteTable::build(vec![s]).unwrap_err();
        assert_eq!((err.route(), err.field()), (Some("big"), "hosts"));

        let too_many: Vec<RouteSpec> = (0..=MAX_ROUTES)
            .map(|i| spec(&format!("r{i}"), "c"))
            .collect();
        let err = RouteTable::build(too_many).unwrap_err();
        assert_eq!((err.route(), err.field()), (None, "routes"));
        assert!(err.to_string().contains("10000"), "{err}");
        let at_limit: Vec<RouteSpec> = (0..MAX_ROUTES)
            .map(|i| spec(&format!("r{i}"), "c"))
            .collect();
        assert_eq!(RouteTable::build(at_limit).unwrap().len(), MAX_ROUTES);
    }

    #[test]
    fn duplicate_hosts_in_one_route_collapse() {
        let t = table(vec![hosts(
            spec("d", "c"),
            &["A.com", "a.com.", "a.com:80"],
        )]);
        assert_eq!(t.routes()[0].hosts.len(), 1);
        assert_eq!(t.entries.len(), 1);
        assert_eq!(t.specs()[0].hosts.len(), 3, "the spec is kept as given");
    }

    #[test]
    fn five_thousand_routes() {
        let mut specs = Vec::new();
        for i in 0..2_000 {
            specs.push(hosts(
                spec(&format!("exact-{i}"), &format!("ce{i}")),
                &[&format!("h{i}.example.com")],
            ));
        }
        for i in 0..2_000 {
            specs.push(path(
                hosts(
                    spec(&format!("wild-{i}"), &format!("cw{i}")),
                    &[&format!("*.w{i}.example.org")],
                ),
                prefix(&format!("/w{i}")),
            ));
        }
        for i in 0..999 {
            specs.push(path(
                spec(&format!("any-{i}"), &format!("ca{i}")),
                exact(&format!("/p{i}")),
            ));
        }
        specs.push(path(spec("fallback", "default"), prefix("/")));
        assert_eq!(specs.len(), 5_000);
        let t = table(specs);
        assert_eq!(t.len(), 5_000);
        let none = HeaderMap::new();
        let cluster = |host: Option<&str>, p: &str| t.find(host, p, &none).map(Route::cluster);
        for i in (0..2_000).step_by(97) {
            assert_eq!(
                cluster(Some(&format!("H{i}.example.com:443")), "/x"),
                Some(format!("ce{i}").as_str())
            );
            assert_eq!(
                cluster(Some(&format!("a.b.w{i}.example.org")), &format!("/w{i}/x")),
                Some(format!("cw{i}").as_str())
            );
            // The wildcard route's path does not match: falls back to any-host.
            assert_eq!(
                cluster(Some(&format!("a.w{i}.example.org")), "/zzz"),
                Some("default")
            );
            // Apex of a wildcard is not matched.
            assert_eq!(
                cluster(Some(&format!("w{i}.example.org")), &format!("/w{i}")),
                Some("default")
            );
        }
        for i in (0..999).step_by(37) {
            assert_eq!(
                cluster(None, &format!("/p{i}")),
                Some(format!("ca{i}").as_str())
            );
            assert_eq!(
                cluster(Some("h5.example.com"), &format!("/p{i}")),
                Some("ce5")
            );
            assert_eq!(
                cluster(Some("unknown.net"), &format!("/p{i}")),
                Some(format!("ca{i}").as_str())
            );
        }
        assert_eq!(cluster(Some("unknown.net"), "/p999"), Some("default"));
    }

    #[test]
    fn arbitrary_input_does_not_panic() {
        let t = table(vec![
            hosts(spec("e", "c"), &["a.example.com"]),
            hosts(spec("w", "c"), &["*.example.com"]),
            path(spec("r", "c"), regex("^/[a-z]+$")),
            header(spec("h", "c"), "x-a", "*"),
        ]);
        let pieces = [
            "", ".", "..", ":", "::", "[", "]", "@", "a", "A", "é", "\u{0}", "\u{ffff}", "💥",
            "example", "com", "*", " ", "\t", "/", "%", "1",
        ];
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let none = HeaderMap::new();
        for _ in 0..20_000 {
            let mut host = String::new();
            let mut p = String::new();
            for _ in 0..(next() % 12) {
                host.push_str(pieces[(next() % pieces.len() as u64) as usize]);
                p.push_str(pieces[(next() % pieces.len() as u64) as usize]);
            }
            let _ = t.find(Some(&host), &p, &none);
            let _ = t.find(None, &p, &none);
        }
        let long = "a.".repeat(5_000) + "example.com";
        assert_eq!(
            find(&t, Some(&long), "/"),
            None,
            "over-long names match only any-host"
        );
        let long_ok = "a.".repeat(100) + "example.com";
        assert_eq!(find(&t, Some(&long_ok), "/"), Some("w"));
    }
}
