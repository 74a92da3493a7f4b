//! The registry of module instances: registrations, leases, drains, pending
//! instructions, and the operator's routing inputs. Every change of
//! membership, health, routes or weights compiles and publishes a new routing
//! snapshot; heartbeats that change none of these rebuild nothing.

mod instance;
mod lifecycle;
mod views;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use shared_types::pb::ModuleType;

pub use instance::{Drain, HealthTimings, Instance, Instruction};
pub use lifecycle::{DueCheck, HeartbeatOutcome, Registered, Tick, Unregistered};
pub use views::{ForcedRebalance, InstanceView, Rebalanced, Strategy, Summary, OVERLOAD_TOLERANCE};

use crate::config::NlbConfig;
use crate::routing::{
    Endpoint, EndpointCounters, EndpointState, KeyInterner, Policy, RouteSpec, RouteStatsCache,
    Router, Snapshot, SnapshotInput,
};

/// Why a registry operation was refused. Each maps to one gRPC code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    ResourceExhausted(String),
}

/// Registry settings taken from the config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub drain_timeout: Duration,
    pub removal_grace: Duration,
    pub max_instances: usize,
    /// Heartbeat stats go into an instance's time series at most this often.
    pub series_interval: Duration,
}

impl Settings {
    pub fn from_config(c: &NlbConfig) -> Self {
        Settings {
            series_interval: Duration::from_secs(c.metrics.sample_interval_seconds),
            drain_timeout: Duration::from_secs(c.registry.drain_timeout_seconds.into()),
            removal_grace: Duration::from_secs(c.registry.removal_grace_seconds.into()),
            max_instances: c.registry.max_instances,
        }
    }
}

/// The operator's routing inputs, from the merged config.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OperatorRouting {
    pub routes: Vec<RouteSpec>,
    /// Pool name -> addresses.
    pub backends: BTreeMap<String, Vec<String>>,
    pub policy: Policy,
}

impl OperatorRouting {
    /// From a validated config (invalid entries were refused by validation).
    pub fn from_config(c: &NlbConfig) -> Self {
        let routes = c
            .routes
            .iter()
            .filter_map(|r| RouteSpec::operator(&r.to_proto()).ok())
            .collect();
        let weights = c
            .traffic_weights
            .iter()
            .filter_map(|(t, versions)| {
                let t = ModuleType::parse_name(t).ok()?;
                Some((t, versions.iter().map(|(v, w)| (v.clone(), *w)).collect()))
            })
            .collect();
        OperatorRouting {
            routes,
            backends: c.backends.clone(),
            policy: Policy {
                weights,
                sticky: c.routing.sticky,
                sticky_types: Default::default(),
                slow_start_ms: c.routing.slow_start_seconds * 1000,
            },
        }
    }
}

pub(crate) struct Inner {
    /// By instance id, in id order: snapshots list servers in that order.
    pub(crate) instances: BTreeMap<String, Instance>,
    /// registration id -> instance id
    pub(crate) by_registration: HashMap<String, String>,
    generation: u64,
    stats_cache: RouteStatsCache,
    /// Announced routes of identical identity share one key.
    route_keys: KeyInterner,
    operator: OperatorRouting,
    backend_endpoints: BTreeMap<String, Vec<Arc<Endpoint>>>,
    settings: Settings,
    /// When each module type's version weights last changed (or were first
    /// seen), for `BlueGreenConfig.deployment_started`.
    pub(crate) weights_since: HashMap<ModuleType, std::time::SystemTime>,
    /// Desired instance counts asked for by `TriggerScaling`, per module type.
    pub(crate) scaling_targets: HashMap<ModuleType, i32>,
    /// Version weights a rollout imposes on its module type (canary first),
    /// over the operator's `traffic_weights`, and whether it is sticky.
    rollout_weights: HashMap<ModuleType, (Vec<(String, u32)>, bool)>,
}

impl Inner {
    /// The version weights in force for a module type: a rollout's, else
    /// the operator's.
    pub(crate) fn weights_of(&self, t: ModuleType) -> Option<&Vec<(String, u32)>> {
        self.rollout_weights
            .get(&t)
            .map(|(w, _)| w)
            .or_else(|| self.operator.policy.weights.get(&t))
    }
}

/// The registry. Cheap to share (`Arc<Registry>`); the lock is held only for
/// short, non-async sections.
pub struct Registry {
    inner: Mutex<Inner>,
    router: Arc<Router>,
}

impl Registry {
    pub fn new(settings: Settings, operator: OperatorRouting) -> Self {
        let registry = Registry {
            inner: Mutex::new(Inner {
                instances: BTreeMap::new(),
                by_registration: HashMap::new(),
                generation: 0,
                stats_cache: RouteStatsCache::default(),
                route_keys: KeyInterner::default(),
                operator: OperatorRouting::default(),
                backend_endpoints: BTreeMap::new(),
                settings,
                scaling_targets: HashMap::new(),
                weights_since: HashMap::new(),
                rollout_weights: HashMap::new(),
            }),
            router: Arc::new(Router::default()),
        };
        // The first snapshot is published even when there is nothing to route.
        if !registry.set_operator_routing(operator) {
            Self::rebuild(&mut registry.inner.lock(), &registry.router);
        }
        registry
    }

    /// The router the data plane and `RouteRequest` read.
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// The current snapshot's generation (bumped on every rebuild).
    pub fn generation(&self) -> u64 {
        self.inner.lock().generation
    }

    pub fn set_settings(&self, settings: Settings) {
        self.inner.lock().settings = settings;
    }

    /// Replaces the operator routes, backend pools and policy; rebuilds the
    /// snapshot if they changed. Returns whether they did.
    pub fn set_operator_routing(&self, operator: OperatorRouting) -> bool {
        let mut inner = self.inner.lock();
        if inner.operator == operator {
            return false;
        }
        let now = std::time::SystemTime::now();
        let types: std::collections::HashSet<ModuleType> = operator
            .policy
            .weights
            .keys()
            .chain(inner.operator.policy.weights.keys())
            .copied()
            .collect();
        for t in types {
            let (old, new) = (
                inner.operator.policy.weights.get(&t),
                operator.policy.weights.get(&t),
            );
            if old != new {
                match new {
                    Some(_) => inner.weights_since.insert(t, now),
                    None => inner.weights_since.remove(&t),
                };
            }
        }
        // Keep the live counters of backend addresses that stay.
        let mut old: HashMap<String, Arc<EndpointCounters>> = inner
            .backend_endpoints
            .values()
            .flatten()
            .map(|e| (e.id.clone(), Arc::clone(&e.counters)))
            .collect();
        inner.backend_endpoints = operator
            .backends
            .iter()
            .map(|(name, addrs)| {
                let endpoints = addrs
                    .iter()
                    .map(|addr| {
                        let id = format!("{name}/{addr}");
                        Arc::new(Endpoint {
                            counters: old.remove(&id).unwrap_or_default(),
                            id,
                            module_type: ModuleType::Unspecified,
                            address: Some(addr.clone()),
                            socket_addr: crate::routing::endpoint::socket_addr(Some(addr)),
                            version: String::new(),
                            state: EndpointState::Healthy,
                            max_connections: 0,
                            capacity_factor: 1.0,
                            proxy_protocol: false,
                        })
                    })
                    .collect();
                (name.clone(), endpoints)
            })
            .collect();
        inner.operator = operator;
        Self::rebuild(&mut inner, &self.router);
        true
    }

    /// Sets (or with `None` clears) the version weights a rollout imposes on
    /// a module type; rebuilds the snapshot if they changed. Returns whether
    /// they did.
    pub fn set_rollout_weights(
        &self,
        module_type: ModuleType,
        weights: Option<(Vec<(String, u32)>, bool)>,
    ) -> bool {
        let mut inner = self.inner.lock();
        if inner.rollout_weights.get(&module_type) == weights.as_ref() {
            return false;
        }
        inner
            .weights_since
            .insert(module_type, std::time::SystemTime::now());
        match weights {
            Some(w) => inner.rollout_weights.insert(module_type, w),
            None => inner.rollout_weights.remove(&module_type),
        };
        Self::rebuild(&mut inner, &self.router);
        true
    }

    /// The weights in force per module type: a rollout's over the
    /// operator's.
    fn policy(inner: &Inner) -> Policy {
        let mut policy = inner.operator.policy.clone();
        for (t, (weights, sticky)) in &inner.rollout_weights {
            policy.weights.insert(*t, weights.clone());
            if *sticky {
                policy.sticky_types.insert(*t);
            }
        }
        policy
    }

    /// Compiles and publishes a snapshot from the current state. It runs on
    /// every change of membership, health, routes or weights and walks every
    /// instance, so it is kept lean: instances are visited in id order (no
    /// sort), an instance whose endpoint did not change lends the previous
    /// snapshot's (no allocation), and announced routes group by a hash
    /// computed once per route.
    fn rebuild(inner: &mut Inner, router: &Router) {
        inner.generation += 1;
        let endpoints: Vec<Arc<Endpoint>> = inner
            .instances
            .values_mut()
            .map(Instance::current_endpoint)
            .collect();
        let mut announced = Vec::new();
        for (instance, endpoint) in inner.instances.values().zip(&endpoints) {
            for spec in &instance.routes {
                announced.push((spec, endpoint));
            }
        }
        let snapshot = Snapshot::build(
            SnapshotInput {
                generation: inner.generation,
                announced,
                operator: &inner.operator.routes,
                instances: &endpoints,
                backends: &inner.backend_endpoints,
                policy: Self::policy(inner),
                now_ms: shared_types::time::unix_millis(std::time::SystemTime::now()),
                // Instances are visited in id order; an instance's route ids
                // are distinct, so are its routes' identities.
                ordered: true,
            },
            &mut inner.stats_cache,
        );
        router.publish(snapshot);
    }

    /// Runs `f` on the locked state; rebuilds the snapshot if it returns true.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut Inner) -> (R, bool)) -> R {
        let mut inner = self.inner.lock();
        let (out, changed) = f(&mut inner);
        if changed {
            Self::rebuild(&mut inner, &self.router);
        }
        out
    }

    /// Reads the locked state.
    pub(crate) fn read<R>(&self, f: impl FnOnce(&Inner) -> R) -> R {
        f(&self.inner.lock())
    }
}
