//! A validated route: the contract's `Route` checked field by field, with what
//! the NLB matches on parsed once.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, OnceLock};

use shared_types::pb::{self, ModuleType, Protocol};

use super::pattern::{cmp_cidr_narrowest_first, Cidr, NamePattern};
use super::Detected;

/// Who serves a route.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// Announced by module instances (`initial_routes` or `UpdateRouting` with
    /// `source_instance_id`): served by the instances that announced it.
    Announced(ModuleType),
    /// An operator route naming a module type: served by all its instances.
    ModuleType(ModuleType),
    /// An operator route naming a static backend pool from the config.
    Backend(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Announced(t) => write!(f, "announced by {t} instances"),
            Target::ModuleType(t) => write!(f, "module type {t}"),
            Target::Backend(b) => write!(f, "backend {b}"),
        }
    }
}

/// One thing wrong with one field of one route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("route {route_id:?}: {field}: {message}")]
pub struct FieldError {
    pub route_id: String,
    pub field: &'static str,
    pub message: String,
}

/// A route the NLB can match.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSpec {
    /// The route as given (shown as given in the routing table).
    pub route: pb::Route,
    pub protocol: Protocol,
    pub source: Option<Cidr>,
    pub destination: NamePattern,
    /// 0 = any port.
    pub port: u16,
    pub priority: i32,
    pub target: Target,
    /// Computed once: snapshots group announced routes by it on every
    /// rebuild, for every instance.
    key: Arc<MergeKey>,
}

/// Protocols no TCP listener can carry.
const NOT_ON_TCP: &[Protocol] = &[
    Protocol::Udp,
    Protocol::Http3,
    Protocol::Hls,
    Protocol::Dash,
];

impl RouteSpec {
    /// Validates an operator route: it must name `metadata["module_type"]` or
    /// `metadata["backend"]`.
    pub fn operator(route: &pb::Route) -> Result<Self, Vec<FieldError>> {
        let module_type = route.metadata.get("module_type").filter(|s| !s.is_empty());
        let backend = route.metadata.get("backend").filter(|s| !s.is_empty());
        let target = match (module_type, backend) {
            (Some(_), Some(_)) => Err("name either module_type or backend, not both".to_string()),
            (None, None) => Err(
                "an operator route names metadata[\"module_type\"] (e.g. alb) or metadata[\"backend\"] (a pool from the config)"
                    .to_string(),
            ),
            (Some(t), None) => ModuleType::parse_name(t)
                .map(Target::ModuleType)
                .map_err(|e| e.to_string()),
            (None, Some(b)) => Ok(Target::Backend(b.clone())),
        };
        Self::build(route, target.map_err(|m| ("metadata", m)))
    }

    /// Validates a route announced by an instance of `module_type`.
    pub fn announced(route: &pb::Route, module_type: ModuleType) -> Result<Self, Vec<FieldError>> {
        Self::build(route, Ok(Target::Announced(module_type)))
    }

    fn build(
        route: &pb::Route,
        target: Result<Target, (&'static str, String)>,
    ) -> Result<Self, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut err = |field: &'static str, message: String| {
            errors.push(FieldError {
                route_id: route.route_id.clone(),
                field,
                message,
            });
        };
        if route.route_id.trim().is_empty() {
            err("route_id", "is empty".into());
        } else if route.route_id.len() > 256 || route.route_id.chars().any(char::is_control) {
            err(
                "route_id",
                "must be at most 256 printable characters".into(),
            );
        }
        let protocol = match Protocol::from_wire(route.protocol) {
            None | Some(Protocol::Unspecified) => {
                err(
                    "protocol",
                    format!("{} is not a protocol this NLB routes", route.protocol),
                );
                Protocol::Unspecified
            }
            Some(p) if NOT_ON_TCP.contains(&p) => {
                err(
                    "protocol",
                    format!("{p} cannot be carried by the NLB's TCP listeners"),
                );
                p
            }
            Some(p) => p,
        };
        let source = if route.source_pattern.trim().is_empty() {
            None
        } else {
            Cidr::parse(&route.source_pattern)
                .map_err(|m| err("source_pattern", m))
                .ok()
        };
        let destination = NamePattern::parse(&route.destination_pattern)
            .map_err(|m| err("destination_pattern", m))
            .unwrap_or(NamePattern::Any);
        let port = u16::try_from(route.destination_port).unwrap_or_else(|_| {
            err(
                "destination_port",
                format!(
                    "{} is not a port (1 to 65535, or 0 for any)",
                    route.destination_port
                ),
            );
            0
        });
        if route.priority < 0 {
            // DESIGN.md: priority 0 (unset) is the lowest; nothing ranks below it.
            err(
                "priority",
                format!("{} is below 0, the lowest priority", route.priority),
            );
        }
        let target = target.map_err(|(f, m)| err(f, m)).ok();
        match target {
            Some(target) if errors.is_empty() => Ok(RouteSpec {
                key: Arc::new(MergeKey::new(route, &target)),
                route: route.clone(),
                protocol,
                source,
                destination,
                port,
                priority: route.priority,
                target,
            }),
            _ => Err(errors),
        }
    }

    pub fn route_id(&self) -> &str {
        &self.route.route_id
    }

    /// Whether this route matches a connection.
    pub fn matches(&self, conn: &super::ConnInfo<'_>) -> bool {
        protocol_matches(self.protocol, conn.protocol)
            && (self.port == 0 || self.port == conn.port)
            && self
                .source
                .is_none_or(|c| conn.client.is_some_and(|ip| c.contains(ip)))
            && self.destination.matches(conn.server_name.as_deref())
    }

    /// Precedence (Less = tried first): higher priority (never negative: 0 is
    /// the lowest); then exact name over wildcard, longer wildcard, narrower
    /// CIDR, declared port over any; then `route_id`.
    pub fn precedence(&self, other: &Self) -> Ordering {
        other
            .priority
            .cmp(&self.priority)
            .then_with(|| {
                other
                    .destination
                    .specificity()
                    .cmp(&self.destination.specificity())
            })
            .then_with(|| cmp_cidr_narrowest_first(self.source.as_ref(), other.source.as_ref()))
            .then_with(|| (other.port != 0).cmp(&(self.port != 0)))
            .then_with(|| self.route.route_id.cmp(&other.route.route_id))
    }

    /// The identity under which announced routes merge: every field but
    /// metadata, plus the announcing module type.
    pub fn merge_key(&self) -> &MergeKey {
        &self.key
    }
}

/// See [`RouteSpec::merge_key`]. Ordered by its fields; hashed and compared
/// for equality through a hash computed once, so grouping thousands of
/// announcements costs one integer compare each (then one field compare to
/// confirm a match).
#[derive(Debug, Clone)]
pub struct MergeKey {
    hash: u64,
    fields: MergeFields,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct MergeFields {
    target: Target,
    route_id: String,
    protocol: i32,
    source_pattern: String,
    destination_pattern: String,
    source_port: i32,
    destination_port: i32,
    path_pattern: String,
    headers: BTreeMap<String, String>,
    priority: i32,
}

impl MergeKey {
    fn new(r: &pb::Route, target: &Target) -> Self {
        let fields = MergeFields {
            target: target.clone(),
            route_id: r.route_id.clone(),
            protocol: r.protocol,
            source_pattern: r.source_pattern.clone(),
            destination_pattern: r.destination_pattern.clone(),
            source_port: r.source_port,
            destination_port: r.destination_port,
            path_pattern: r.path_pattern.clone(),
            headers: r
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            priority: r.priority,
        };
        // Keyed per process, so no client can choose colliding routes.
        static KEYS: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
        let hash = KEYS.get_or_init(Default::default).hash_one(&fields);
        MergeKey { hash, fields }
    }
}

impl PartialEq for MergeKey {
    fn eq(&self, other: &Self) -> bool {
        // Interned keys (see [`KeyInterner`]) are the same object.
        std::ptr::eq(self, other) || (self.hash == other.hash && self.fields == other.fields)
    }
}

impl Eq for MergeKey {}

impl Hash for MergeKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialOrd for MergeKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for MergeKey {
    fn cmp(&self, other: &Self) -> Ordering {
        self.fields.cmp(&other.fields)
    }
}

/// Makes identical routes share one [`MergeKey`], so that grouping the
/// announcements of thousands of instances compares pointers rather than
/// every field of every route (scattered over memory) on each rebuild.
#[derive(Debug, Default)]
pub struct KeyInterner {
    keys: std::collections::HashSet<Arc<MergeKey>, Prehashed>,
    /// Keys held after the last pruning.
    kept: usize,
}

impl KeyInterner {
    /// Keys held (some may be unused until the next pruning).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Points `spec` at the shared key for its identity.
    pub fn intern(&mut self, spec: &mut RouteSpec) {
        match self.keys.get(&*spec.key) {
            Some(shared) => spec.key = Arc::clone(shared),
            None => {
                self.keys.insert(Arc::clone(&spec.key));
                // Keys no route uses any more go, in amortized O(1).
                if self.keys.len() > 2 * self.kept.max(64) {
                    self.keys.retain(|k| Arc::strong_count(k) > 1);
                    self.kept = self.keys.len();
                }
            }
        }
    }
}

/// A hasher for keys that carry their own hash ([`MergeKey`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct PrehashedHasher(u64);

impl Hasher for PrehashedHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is expected; fold anything else in anyway.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Builds [`PrehashedHasher`]s.
pub type Prehashed = std::hash::BuildHasherDefault<PrehashedHasher>;

/// One error per route id given more than once in a set of routes.
pub fn duplicate_ids(routes: &[pb::Route]) -> Vec<FieldError> {
    let mut seen = std::collections::HashSet::new();
    routes
        .iter()
        .filter(|r| !r.route_id.is_empty() && !seen.insert(r.route_id.as_str()))
        .map(|r| FieldError {
            route_id: r.route_id.clone(),
            field: "route_id",
            message: "given twice".into(),
        })
        .collect()
}

/// Which detected protocols a route protocol matches. `TCP` matches anything
/// (it is the fallback, tried after every protocol-specific route).
pub fn protocol_matches(route: Protocol, detected: Detected) -> bool {
    match route {
        Protocol::Tcp => true,
        Protocol::Https | Protocol::Rtmps => detected == Detected::Tls,
        Protocol::Http | Protocol::Websocket => detected == Detected::Http1,
        Protocol::Http2 | Protocol::Grpc => detected == Detected::Http2,
        Protocol::Postgres => detected == Detected::Postgres,
        Protocol::Mysql => detected == Detected::Mysql,
        Protocol::Mongodb => detected == Detected::Mongodb,
        Protocol::Redis => detected == Detected::Redis,
        Protocol::Rtmp => detected == Detected::Rtmp,
        _ => false,
    }
}
