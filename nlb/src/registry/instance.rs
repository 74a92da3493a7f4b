//! One registered module instance and the rules of its liveness.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use shared_types::pb::{self, HealthStatus, ModuleType};
use tokio::time::Instant;

use crate::routing::{Endpoint, EndpointCounters, EndpointState, RouteSpec};

/// Heartbeat and health-check timings, with DESIGN.md's zero-value defaults:
/// interval 0 = 2 s, timeout 0 = 1 s, unhealthy threshold 0 = 3, healthy
/// threshold 0 = 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthTimings {
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
}

impl Default for HealthTimings {
    fn default() -> Self {
        HealthTimings {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            unhealthy_threshold: 3,
            healthy_threshold: 1,
        }
    }
}

impl HealthTimings {
    /// Reads a `HealthCheckConfig`, refusing values out of range.
    pub fn from_proto(cfg: Option<&pb::HealthCheckConfig>) -> Result<Self, String> {
        let d = HealthTimings::default();
        let Some(c) = cfg else { return Ok(d) };
        let field = |name: &str, v: i32, max: i32| -> Result<Option<u32>, String> {
            if v < 0 || v > max {
                Err(format!(
                    "health_config.{name}: {v} is out of range (0 to {max})"
                ))
            } else {
                Ok((v > 0).then_some(v as u32))
            }
        };
        Ok(HealthTimings {
            interval: field("interval_seconds", c.interval_seconds, 3600)?
                .map_or(d.interval, |s| Duration::from_secs(s.into())),
            timeout: field("timeout_seconds", c.timeout_seconds, 600)?
                .map_or(d.timeout, |s| Duration::from_secs(s.into())),
            unhealthy_threshold: field("unhealthy_threshold", c.unhealthy_threshold, 100)?
                .unwrap_or(d.unhealthy_threshold),
            healthy_threshold: field("healthy_threshold", c.healthy_threshold, 100)?
                .unwrap_or(d.healthy_threshold),
        })
    }

    /// How long without a heartbeat before an instance takes no new traffic.
    pub fn lease(&self) -> Duration {
        self.interval * self.unhealthy_threshold
    }
}

/// What the NLB asks an instance to do in its next heartbeat response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instruction {
    Reload,
    Shed(u32),
}

/// A graceful unregister in progress.
#[derive(Debug, Clone, Copy)]
pub struct Drain {
    pub deadline: Instant,
    pub deadline_wall: SystemTime,
    pub connections_at_start: i64,
}

/// A registered instance.
#[derive(Debug)]
pub struct Instance {
    /// As registered (the NLB fills status, connections and weight on view).
    pub info: pb::ModuleInstance,
    pub module_type: ModuleType,
    pub registration_id: String,
    /// The token that registered it (none when the API is open): only that
    /// token, or an operator, acts for the instance.
    pub owner: Option<String>,
    pub routes: Vec<RouteSpec>,
    pub capabilities: HashMap<String, String>,
    pub timings: HealthTimings,
    pub registered_at: SystemTime,
    pub data_address: Option<String>,
    pub proxy_protocol: bool,
    pub counters: Arc<EndpointCounters>,
    pub capacity_factor: f64,

    pub last_beat: Instant,
    pub last_beat_wall: SystemTime,
    /// The status the instance reports of itself.
    pub reported: HealthStatus,
    /// Heartbeats arrive within the lease.
    pub lease_ok: bool,
    /// Beats since the lease lapsed (toward `healthy_threshold`).
    pub recovering_beats: u32,
    /// Active `HealthCheck` calls pass (true until proven otherwise).
    pub check_ok: bool,
    pub check_failures: u32,
    pub check_successes: u32,
    pub last_check: Option<(SystemTime, String)>,
    pub next_check: Instant,

    pub draining: Option<Drain>,
    pub stats: Option<pb::ModuleStats>,
    pub stats_at: Option<SystemTime>,
    /// When its heartbeat stats last went into its time series.
    pub series_at: Option<Instant>,
    pub pending: Option<Instruction>,
    /// The endpoint last compiled into a snapshot, reused while it still
    /// describes the instance (see [`Instance::current_endpoint`]).
    pub(super) endpoint: Option<Arc<Endpoint>>,
}

impl Instance {
    /// Its open connections: the NLB's own count of those it forwarded, or
    /// the module's latest report when that is higher (a module also counts
    /// connections that reached it another way, and the report is all there
    /// is before the data plane forwards any).
    pub fn active_connections(&self) -> i64 {
        // A report is the module's word: bounded, so no sum over instances
        // can overflow.
        let reported = self
            .stats
            .as_ref()
            .map_or(0, |s| s.active_connections.clamp(0, i64::from(i32::MAX)));
        self.counters.active().max(reported)
    }

    /// Whether the instance may take new connections, and if not, why.
    pub fn state(&self) -> (EndpointState, &'static str) {
        if self.draining.is_some() {
            return (EndpointState::Draining, "draining");
        }
        if !self.lease_ok {
            return (EndpointState::Unhealthy, "missed heartbeats");
        }
        if !self.check_ok {
            return (EndpointState::Unhealthy, "failing health checks");
        }
        match self.reported {
            HealthStatus::Unhealthy => (EndpointState::Unhealthy, "reports unhealthy"),
            HealthStatus::Starting => (EndpointState::Unhealthy, "still starting"),
            HealthStatus::Stopping | HealthStatus::Stopped => {
                (EndpointState::Unhealthy, "reports stopping")
            }
            _ => (EndpointState::Healthy, "healthy"),
        }
    }

    /// The health status the NLB shows for the instance.
    pub fn effective_status(&self) -> HealthStatus {
        match self.state().0 {
            EndpointState::Draining => HealthStatus::Stopping,
            EndpointState::Unhealthy
                if self.reported == HealthStatus::Starting && self.lease_ok =>
            {
                HealthStatus::Starting
            }
            EndpointState::Unhealthy
                if matches!(
                    self.reported,
                    HealthStatus::Stopping | HealthStatus::Stopped
                ) =>
            {
                self.reported
            }
            EndpointState::Unhealthy => HealthStatus::Unhealthy,
            EndpointState::Healthy if self.reported == HealthStatus::Degraded => {
                HealthStatus::Degraded
            }
            EndpointState::Healthy => HealthStatus::Healthy,
        }
    }

    /// The endpoint for the next snapshot: the previous one if nothing it
    /// holds has changed, else a new one (kept for next time).
    pub fn current_endpoint(&mut self) -> Arc<Endpoint> {
        if let Some(e) = &self.endpoint {
            // State and capacity change in place. The rest (id, type,
            // addresses, version, limits) is set when the instance is
            // (re-)registered, which builds a new `Instance`: comparing those
            // strings on every rebuild would cost a cache miss per instance.
            let same = e.state == self.state().0
                && e.capacity_factor.to_bits() == self.capacity_factor.to_bits()
                && e.max_connections == u32::try_from(self.info.max_connections).unwrap_or(0)
                && e.proxy_protocol == self.proxy_protocol
                && e.module_type == self.module_type
                && Arc::ptr_eq(&e.counters, &self.counters);
            if same {
                debug_assert!(
                    e.address == self.data_address
                        && e.version == self.info.version
                        && e.id == self.info.instance_id,
                    "an instance's address, version or id changed in place: clear its endpoint"
                );
                return Arc::clone(e);
            }
        }
        let e = Arc::new(self.endpoint());
        self.endpoint = Some(Arc::clone(&e));
        e
    }

    /// The endpoint the routing snapshot balances over.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            id: self.info.instance_id.clone(),
            module_type: self.module_type,
            address: self.data_address.clone(),
            socket_addr: crate::routing::endpoint::socket_addr(self.data_address.as_deref()),
            version: self.info.version.clone(),
            state: self.state().0,
            max_connections: u32::try_from(self.info.max_connections).unwrap_or(0),
            capacity_factor: self.capacity_factor,
            proxy_protocol: self.proxy_protocol,
            counters: Arc::clone(&self.counters),
        }
    }
}
