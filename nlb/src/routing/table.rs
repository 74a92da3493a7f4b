//! The routing snapshot: every route in precedence order with the endpoints
//! that serve it, and the version weights, compiled together and never changed
//! after. The control plane builds a new one on every change of membership,
//! health, routes or weights; the data plane reads one per connection.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use shared_types::pb::ModuleType;

use super::balance::{choose_endpoint, choose_version};
use super::endpoint::Endpoint;
use super::route::{MergeKey, Prehashed, RouteSpec, Target};
use super::ConnInfo;

/// Per-route bookkeeping that survives rebuilds.
#[derive(Debug)]
pub struct RouteStats {
    pub created_at_ms: u64,
    last_used_ms: AtomicU64,
}

impl RouteStats {
    pub fn last_used_ms(&self) -> u64 {
        self.last_used_ms.load(Ordering::Relaxed)
    }

    /// The route took a connection at `now_ms` (unix milliseconds).
    pub fn mark_used(&self, now_ms: u64) {
        self.last_used_ms.store(now_ms, Ordering::Relaxed);
    }
}

/// Keeps route stats across rebuilds, keyed by route identity.
#[derive(Debug, Default)]
pub struct RouteStatsCache(HashMap<Arc<MergeKey>, Arc<RouteStats>, Prehashed>);

/// A route with the endpoints serving it.
#[derive(Debug)]
pub struct CompiledRoute {
    pub spec: RouteSpec,
    /// Every endpoint serving the route, able to take traffic or not, by
    /// id. Routes naming the same module type share one list.
    pub servers: Arc<[Arc<Endpoint>]>,
    pub stats: Arc<RouteStats>,
}

/// How versions and instances are chosen.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    /// Per module type: (version, percent) sorted by version, summing to 100.
    pub weights: HashMap<ModuleType, Vec<(String, u32)>>,
    /// Choose version and instance by a hash of the client address.
    pub sticky: bool,
    /// Module types chosen that way whatever `sticky` says (a rollout that
    /// asked for stickiness).
    pub sticky_types: std::collections::HashSet<ModuleType>,
    /// How long a new instance's capacity ramps up (0 = no ramp).
    pub slow_start_ms: u64,
}

/// Why a connection could not be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no route matches {0}")]
    NoRoute(String),
    #[error("route {route_id:?} matches but {reason}")]
    NoServer { route_id: String, reason: String },
}

/// A routing decision.
#[derive(Debug)]
pub struct Selection<'s> {
    pub route: &'s CompiledRoute,
    pub endpoint: &'s Arc<Endpoint>,
}

/// Everything a snapshot is built from.
pub struct SnapshotInput<'a> {
    pub generation: u64,
    /// Each announced route with the instance that announced it.
    pub announced: Vec<(&'a RouteSpec, &'a Arc<Endpoint>)>,
    pub operator: &'a [RouteSpec],
    /// Every registered instance (for operator routes naming a module type).
    pub instances: &'a [Arc<Endpoint>],
    pub backends: &'a BTreeMap<String, Vec<Arc<Endpoint>>>,
    pub policy: Policy,
    pub now_ms: u64,
    /// The caller gives `instances` in increasing id order, one entry per
    /// id, and `announced` in the same order, an instance's routes together
    /// with the same endpoint `Arc`: servers then need no sorting, only
    /// repeats of one endpoint dropped. Checked in debug builds. `false`
    /// sorts them.
    pub ordered: bool,
}

/// The servers of a route being compiled: its own list, or the list of a
/// module type's instances that several routes share.
enum Servers {
    Own(Vec<Arc<Endpoint>>),
    Shared(Arc<[Arc<Endpoint>]>),
}

/// `list` by id without duplicates. `ordered`: the caller says it already is
/// (checked in debug builds).
fn sorted(mut list: Vec<Arc<Endpoint>>, ordered: bool) -> Arc<[Arc<Endpoint>]> {
    if ordered {
        // An instance announcing the same route twice is listed once.
        list.dedup_by(|a, b| Arc::ptr_eq(a, b));
        debug_assert!(
            list.is_sorted_by(|a, b| a.id < b.id),
            "servers given as ordered are not in increasing id order"
        );
    } else {
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list.dedup_by(|a, b| a.id == b.id);
    }
    list.into()
}

/// One immutable routing table.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub generation: u64,
    /// Protocol-specific routes, in precedence order.
    specific: Vec<CompiledRoute>,
    /// `TCP` routes, in precedence order: tried when no specific route matches.
    fallback: Vec<CompiledRoute>,
    pub policy: Policy,
}

impl Snapshot {
    /// Compiles a snapshot. Identical announced routes from several instances
    /// merge into one route served by all of them.
    pub fn build(input: SnapshotInput<'_>, cache: &mut RouteStatsCache) -> Snapshot {
        // Routes by identity, in first-seen order; sorted by identity below.
        // Each announcement costs a lookup by its precomputed hash.
        let mut merged: Vec<(&RouteSpec, Servers)> = Vec::new();
        let mut index: HashMap<&MergeKey, usize, Prehashed> = HashMap::default();
        for (spec, instance) in input.announced {
            match index.entry(spec.merge_key()) {
                Entry::Occupied(i) => match &mut merged[*i.get()].1 {
                    Servers::Own(list) => list.push(Arc::clone(instance)),
                    Servers::Shared(_) => unreachable!("announced routes own their servers"),
                },
                Entry::Vacant(v) => {
                    v.insert(merged.len());
                    merged.push((spec, Servers::Own(vec![Arc::clone(instance)])));
                }
            }
        }
        // The instances of each module type an operator route names, once.
        let mut of_type: HashMap<ModuleType, Arc<[Arc<Endpoint>]>> = HashMap::new();
        for spec in input.operator {
            let servers = match &spec.target {
                Target::ModuleType(t) => {
                    Servers::Shared(Arc::clone(of_type.entry(*t).or_insert_with(|| {
                        sorted(
                            input
                                .instances
                                .iter()
                                .filter(|e| e.module_type == *t)
                                .cloned()
                                .collect(),
                            input.ordered,
                        )
                    })))
                }
                Target::Backend(name) => {
                    Servers::Own(input.backends.get(name).cloned().unwrap_or_default())
                }
                Target::Announced(_) => Servers::Own(Vec::new()),
            };
            // The same identity given again replaces the route and its servers.
            match index.entry(spec.merge_key()) {
                Entry::Occupied(i) => merged[*i.get()] = (spec, servers),
                Entry::Vacant(v) => {
                    v.insert(merged.len());
                    merged.push((spec, servers));
                }
            }
        }
        drop(index);
        // Identity order, so routes that tie on precedence keep a stable order.
        merged.sort_by(|a, b| a.0.merge_key().cmp(b.0.merge_key()));

        let mut fresh = HashMap::with_capacity_and_hasher(merged.len(), Prehashed::default());
        let mut specific = Vec::new();
        let mut fallback = Vec::new();
        for (spec, servers) in merged {
            let servers = match servers {
                Servers::Shared(list) => list,
                // Announced in id order when `ordered`; backends as listed.
                Servers::Own(list) => {
                    let ordered = input.ordered && !matches!(spec.target, Target::Backend(_));
                    sorted(list, ordered)
                }
            };
            let key = spec.merge_key();
            let (key, stats) = match cache.0.remove_entry(key) {
                Some(kept) => kept,
                None => (
                    Arc::new(key.clone()),
                    Arc::new(RouteStats {
                        created_at_ms: input.now_ms,
                        last_used_ms: AtomicU64::new(0),
                    }),
                ),
            };
            fresh.insert(key, Arc::clone(&stats));
            let route = CompiledRoute {
                spec: spec.clone(),
                servers,
                stats,
            };
            if route.spec.protocol == shared_types::pb::Protocol::Tcp {
                fallback.push(route);
            } else {
                specific.push(route);
            }
        }
        cache.0 = fresh;
        specific.sort_by(|a, b| a.spec.precedence(&b.spec));
        fallback.sort_by(|a, b| a.spec.precedence(&b.spec));
        Snapshot {
            generation: input.generation,
            specific,
            fallback,
            policy: input.policy,
        }
    }

    /// Every route, in the order they are tried.
    pub fn routes(&self) -> impl Iterator<Item = &CompiledRoute> {
        self.specific.iter().chain(&self.fallback)
    }

    /// The route a connection matches: the first protocol-specific route in
    /// precedence order, else the first `TCP` route.
    pub fn find_route(&self, conn: &ConnInfo<'_>) -> Option<&CompiledRoute> {
        self.routes().find(|r| r.spec.matches(conn))
    }

    /// Routes a connection: its route, then a version by weight, then an
    /// instance by load. Endpoints whose id is in `exclude` (already tried)
    /// are skipped.
    pub fn select(
        &self,
        conn: &ConnInfo<'_>,
        exclude: &[&str],
    ) -> Result<Selection<'_>, RouteError> {
        let route = self
            .find_route(conn)
            .ok_or_else(|| RouteError::NoRoute(conn.to_string()))?;
        let no_server = |reason: String| RouteError::NoServer {
            route_id: route.spec.route_id().to_string(),
            reason,
        };
        if route.servers.is_empty() {
            return Err(no_server(format!("has no servers ({})", route.spec.target)));
        }
        let mut usable: Vec<&Arc<Endpoint>> = route
            .servers
            .iter()
            .filter(|e| e.accepts_new() && !exclude.contains(&e.id.as_str()))
            .collect();
        if usable.is_empty() {
            // Every server ejected by connect failures (a local fault, or
            // all restarting): trying one beats refusing every connection.
            usable = route
                .servers
                .iter()
                .filter(|e| e.could_take_new() && !exclude.contains(&e.id.as_str()))
                .collect();
        }
        if usable.is_empty() {
            return Err(no_server(format!(
                "none of its {} servers can take a connection (unhealthy, draining, full, without a data address or already tried)",
                route.servers.len()
            )));
        }
        let module_type = usable[0].module_type;
        let sticky = if self.policy.sticky || self.policy.sticky_types.contains(&module_type) {
            conn.client
        } else {
            None
        };
        let candidates: Vec<&Arc<Endpoint>> = match self.policy.weights.get(&module_type) {
            Some(weights) if module_type != ModuleType::Unspecified => {
                let version = choose_version(weights, &usable, sticky).ok_or_else(|| {
                    let names: Vec<&str> = weights
                        .iter()
                        .filter(|(_, w)| *w > 0)
                        .map(|(v, _)| v.as_str())
                        .collect();
                    no_server(format!(
                        "no server of the weighted versions ({}) can take a connection",
                        names.join(", ")
                    ))
                })?;
                usable
                    .into_iter()
                    .filter(|e| e.version == version)
                    .collect()
            }
            _ => usable,
        };
        let endpoint = choose_endpoint(&candidates, sticky, self.policy.slow_start_ms)
            .ok_or_else(|| no_server("no candidate left".to_string()))?;
        Ok(Selection { route, endpoint })
    }

    /// Counts a routing decision that opened no connection.
    pub fn record_routed(selection: &Selection<'_>, now_ms: u64) {
        selection.endpoint.counters.record_routed(now_ms);
        selection.route.stats.mark_used(now_ms);
    }
}
