//! What the routing core balances over: module instances and static backend
//! addresses, each with live counters shared across snapshots.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use shared_types::pb::ModuleType;

/// Capacity assumed for an instance with `max_connections` 0 (unlimited) when
/// computing its load score.
pub const DEFAULT_CAPACITY: f64 = 1000.0;

/// Live counters of one endpoint. They outlive snapshots: a rebuilt snapshot
/// points at the same counters, so nothing is lost or double counted.
#[derive(Debug, Default)]
pub struct EndpointCounters {
    active: AtomicI64,
    total: AtomicU64,
    last_used_ms: AtomicU64,
    /// Connect failures in a row (the data plane's).
    failures: AtomicU32,
    /// Ejected until this [`mono_ms`] instant; 0 = not ejected, `u64::MAX`
    /// = until the instance heartbeats healthy.
    ejected_until_ms: AtomicU64,
    /// Connections this endpoint failed, ever: connects that failed, and
    /// connections it ended without answering a byte (rollout analysis).
    failed_total: AtomicU64,
    /// When it started taking traffic ([`mono_ms`]), for slow start; 0 =
    /// always warm (static backends).
    warm_from_ms: AtomicU64,
}

pub use shared_types::time::mono_ms;

impl EndpointCounters {
    pub fn active(&self) -> i64 {
        self.active.load(Ordering::Relaxed).max(0)
    }
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
    pub fn last_used_ms(&self) -> u64 {
        self.last_used_ms.load(Ordering::Relaxed)
    }
    /// Counts one routing decision that sent no connection (a `RouteRequest`).
    pub fn record_routed(&self, now_ms: u64) {
        self.total.fetch_add(1, Ordering::Relaxed);
        self.last_used_ms.store(now_ms, Ordering::Relaxed);
    }
    /// Records a failed connect; ejects the endpoint (until `until_ms`) once
    /// `threshold` failures come in a row. True when this one ejected it.
    pub fn connect_failed(&self, threshold: u32, until_ms: u64) -> bool {
        self.failed_total.fetch_add(1, Ordering::Relaxed);
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        // One of several failing at once ejects it (and is counted).
        n >= threshold
            && self
                .ejected_until_ms
                .compare_exchange(0, until_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Counters of a new instance: its slow start begins now.
    pub fn warming() -> Self {
        let c = EndpointCounters::default();
        c.warm_from_ms.store(mono_ms(), Ordering::Relaxed);
        c
    }

    /// Starts its slow start again (a restarted instance is cold).
    pub fn restart_warming(&self) {
        if self.warm_from_ms.load(Ordering::Relaxed) != 0 {
            self.warm_from_ms.store(mono_ms(), Ordering::Relaxed);
        }
    }

    /// The share of its capacity it counts with, `slow_start_ms` into its
    /// life: 10% at first, growing evenly to 100%.
    pub fn warmth(&self, now_ms: u64, slow_start_ms: u64) -> f64 {
        let from = self.warm_from_ms.load(Ordering::Relaxed);
        if slow_start_ms == 0 || from == 0 {
            return 1.0;
        }
        let age = now_ms.saturating_sub(from);
        if age >= slow_start_ms {
            return 1.0;
        }
        (0.1 + 0.9 * age as f64 / slow_start_ms as f64).min(1.0)
    }

    /// Records a proxied connection the endpoint failed: it reset it, or
    /// closed it without answering a byte to a client that had sent some.
    pub fn record_instance_failure(&self) {
        self.failed_total.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections failed so far: failed connects, resets, unanswered ones.
    pub fn failed_total(&self) -> u64 {
        self.failed_total.load(Ordering::Relaxed)
    }

    /// Records a successful connect: the run of failures ends.
    pub fn connect_succeeded(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// Ejected by connect failures (and not yet back).
    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if until != u64::MAX && mono_ms() >= until {
            self.clear_ejection();
            return false;
        }
        true
    }

    /// Takes an endpoint back (a healthy heartbeat, or its time is up).
    pub fn clear_ejection(&self) {
        if self.ejected_until_ms.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
            self.ejected_until_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a connection opened; the guard counts it closed when dropped.
    pub fn open_connection(self: &Arc<Self>, now_ms: u64) -> ConnectionGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.record_routed(now_ms);
        ConnectionGuard(Arc::clone(self))
    }
}

/// Held for the life of a connection to an endpoint.
#[derive(Debug)]
pub struct ConnectionGuard(Arc<EndpointCounters>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether an endpoint may take new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointState {
    Healthy,
    /// Missed heartbeats or failed active health checks.
    Unhealthy,
    /// Unregistering or told to drain: existing connections finish.
    Draining,
}

impl EndpointState {
    /// The lowercase name shown in `details["state"]`, `/status` and the
    /// `nlb_instances` gauge.
    pub fn name(self) -> &'static str {
        match self {
            EndpointState::Healthy => "healthy",
            EndpointState::Unhealthy => "unhealthy",
            EndpointState::Draining => "draining",
        }
    }
}

/// A module instance or static backend address, as a snapshot sees it.
#[derive(Debug)]
pub struct Endpoint {
    /// Instance id, or `pool/host:port` for a static backend.
    pub id: String,
    /// `Unspecified` for static backends.
    pub module_type: ModuleType,
    /// Where traffic goes (`metadata["data_address"]`); `None` takes no traffic.
    pub address: Option<String>,
    /// `address` parsed, when it is an IP address and port (see
    /// [`socket_addr`]): connections go there without parsing it each time.
    /// A host name is resolved at each connect.
    pub socket_addr: Option<SocketAddr>,
    pub version: String,
    pub state: EndpointState,
    /// 0 = unlimited.
    pub max_connections: u32,
    /// Refreshed by `RebalanceLoad`; scales the capacity (1.0 = nominal).
    pub capacity_factor: f64,
    /// The instance asked for a PROXY v2 header.
    pub proxy_protocol: bool,
    pub counters: Arc<EndpointCounters>,
}

/// `address` as an IP address and port, if it is one.
pub fn socket_addr(address: Option<&str>) -> Option<SocketAddr> {
    address?.parse().ok()
}

impl Endpoint {
    /// Full: `max_connections` set and reached.
    pub fn is_full(&self) -> bool {
        self.max_connections > 0 && self.counters.active() >= i64::from(self.max_connections)
    }

    /// Healthy, not draining, has a data address, is not full and not
    /// ejected by connect failures.
    pub fn accepts_new(&self) -> bool {
        self.could_take_new() && !self.counters.is_ejected()
    }

    /// As [`Endpoint::accepts_new`], ejection aside.
    pub fn could_take_new(&self) -> bool {
        self.state == EndpointState::Healthy && self.address.is_some() && !self.is_full()
    }

    /// Active connections relative to effective capacity.
    pub fn load_score(&self) -> f64 {
        self.load_score_warming(0, 0)
    }

    /// [`Endpoint::load_score`] with its slow start: a young instance
    /// counts with a part of its capacity (see [`EndpointCounters::warmth`]).
    pub fn load_score_warming(&self, now_ms: u64, slow_start_ms: u64) -> f64 {
        let nominal = if self.max_connections > 0 {
            f64::from(self.max_connections)
        } else {
            DEFAULT_CAPACITY
        };
        let warmth = self.counters.warmth(now_ms, slow_start_ms);
        self.counters.active() as f64 / (nominal * self.capacity_factor.clamp(0.05, 10.0) * warmth)
    }
}
