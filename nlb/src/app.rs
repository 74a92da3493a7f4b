//! The NLB's shared state: registry, config, metrics and module clients, and
//! how a config change is applied to them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use shared_types::pb::{self, HealthStatus, ModuleType};

use crate::config::{ConfigStore, NlbConfig};
use crate::control::module_client::ModuleClients;
use crate::metrics::{series::NLB_OWNER, NlbMetrics, SeriesStore};
use crate::registry::{InstanceView, OperatorRouting, Registry, Settings, Summary};
use crate::routing::EndpointState;
use crate::security::Security;

/// Counts over one listing of the registry, so a status answer walks the
/// instances once.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Census {
    pub instances: usize,
    /// Taking new connections.
    pub healthy: usize,
    /// Some instance is `UNHEALTHY` (lapsed lease, failing checks or
    /// reporting itself unhealthy); draining and starting ones do not count.
    pub any_unhealthy: bool,
    pub active_connections: i64,
    /// Instances by module type name.
    pub by_type: std::collections::HashMap<String, i32>,
}

impl Census {
    pub fn of(views: &[InstanceView]) -> Self {
        let summaries: Vec<Summary> = views.iter().map(InstanceView::summary).collect();
        Self::of_summaries(&summaries)
    }

    pub fn of_summaries(instances: &[Summary]) -> Self {
        let mut c = Census {
            instances: instances.len(),
            ..Census::default()
        };
        for s in instances {
            c.healthy += usize::from(s.state == EndpointState::Healthy);
            c.any_unhealthy |= s.health_status == HealthStatus::Unhealthy;
            c.active_connections += i64::from(s.current_connections);
            *c.by_type
                .entry(s.module_type.short_name().to_string())
                .or_insert(0) += 1;
        }
        c
    }
}

/// Everything the control API, the admin port and the background loops share.
pub struct Nlb {
    pub registry: Arc<Registry>,
    pub config: ConfigStore,
    pub metrics: NlbMetrics,
    pub series: SeriesStore,
    pub modules: ModuleClients,
    /// Tokens and TLS in force.
    pub security: Arc<Security>,
    pub started_at: SystemTime,
    /// Routing decisions made (RouteRequest and, later, connections).
    pub total_requests: AtomicU64,
    /// False while starting and once shutdown begins.
    pub ready: AtomicBool,
    pub shutting_down: AtomicBool,
    /// Turns true when shutdown begins, so long-lived calls (metrics streams)
    /// end instead of holding the shutdown until its deadline.
    pub shutdown_signal: tokio::sync::watch::Sender<bool>,
    /// Serializes applying config to the live parts (see [`Nlb::apply_config`]).
    apply_lock: parking_lot::Mutex<()>,
    /// The addresses actually bound (set once serving).
    pub bound: std::sync::OnceLock<(std::net::SocketAddr, std::net::SocketAddr)>,
    /// The L4 data plane (its listeners start with [`crate::start`]).
    pub dataplane: Arc<crate::dataplane::Dataplane>,
    /// Set once serving: config changes then reach the listeners.
    pub dataplane_started: AtomicBool,
    /// Canary and blue/green rollouts (persisted beside the state file).
    pub rollouts: crate::rollout::Rollouts,
    /// Why the rollouts file could not be read: the NLB then does not start.
    pub rollouts_error: Option<String>,
    /// The autoscaler's latest decisions.
    pub scaling: crate::scaling::ScalingLog,
    /// The forced rebalance following up, if any (one at a time; a newer
    /// forced call's arguments replace its own).
    pub rebalancing: parking_lot::Mutex<Option<crate::registry::ForcedRebalance>>,
}

impl Nlb {
    pub fn new(config: ConfigStore) -> Arc<Self> {
        let c = config.current();
        let security = Arc::new(Security::default());
        let registry = Arc::new(Registry::new(
            Settings::from_config(&c),
            OperatorRouting::from_config(&c),
        ));
        let metrics = NlbMetrics::new();
        let dataplane = crate::dataplane::Dataplane::new(
            Arc::clone(registry.router()),
            c.dataplane,
            &metrics.prometheus,
        )
        .expect("data-plane metrics register once");
        let rollouts_path = crate::rollout::path_beside(config.state_file().path());
        let (rollouts, rollouts_error) = match crate::rollout::Rollouts::load(rollouts_path.clone())
        {
            Ok(r) => (r, None),
            Err(e) => (crate::rollout::Rollouts::empty(rollouts_path), Some(e)),
        };
        let nlb = Arc::new(Nlb {
            rollouts,
            rollouts_error,
            scaling: crate::scaling::ScalingLog::default(),
            rebalancing: parking_lot::Mutex::new(None),
            registry,
            series: SeriesStore::new(
                c.metrics.retention_points,
                c.metrics.max_series_per_instance,
            ),
            metrics,
            modules: ModuleClients::new(security.module_call_token.clone()),
            security,
            config,
            started_at: SystemTime::now(),
            total_requests: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            shutdown_signal: tokio::sync::watch::Sender::new(false),
            apply_lock: parking_lot::Mutex::new(()),
            bound: std::sync::OnceLock::new(),
            dataplane,
            dataplane_started: AtomicBool::new(false),
        });
        nlb.rollouts.set_metrics(
            nlb.metrics.rollout_events.clone(),
            nlb.metrics.rollout_canary_weight.clone(),
        );
        nlb.refresh_gauges();
        nlb
    }

    /// Marks the NLB as stopping: not ready, and streams end.
    pub fn begin_shutdown(&self) {
        self.ready.store(false, Ordering::Relaxed);
        self.shutting_down.store(true, Ordering::Relaxed);
        self.shutdown_signal.send_replace(true);
    }

    /// Applies the config in force to the live parts. Calls are serialized
    /// and each reads the latest config, so concurrent changes can never
    /// leave the live parts on an older one.
    pub fn apply_config(&self) {
        let _serial = self.apply_lock.lock();
        let c = self.config.current();
        let c: &NlbConfig = &c;
        self.registry.set_settings(Settings::from_config(c));
        if !c.health.active_checks {
            // Without active checks, liveness is the heartbeat lease alone.
            self.registry.clear_check_failures();
        }
        self.registry
            .set_operator_routing(OperatorRouting::from_config(c));
        self.series.set_limits(
            c.metrics.retention_points,
            c.metrics.max_series_per_instance,
        );
        if self.dataplane_started.load(Ordering::Relaxed) {
            // A listener that cannot bind is logged and counted; the others
            // apply.
            let _ = self.dataplane.apply(&c.listeners, &c.dataplane);
        }
        self.refresh_gauges();
    }

    /// Re-reads the tokens and TLS files: all of them when `force`, else
    /// those changed on disk.
    pub fn reload_security(&self, force: bool) {
        let config = self.config.current();
        self.security
            .reload(&config, &|v| self.config.env_var(v), &self.metrics, force);
    }

    /// Re-reads the config file (SIGHUP), then the tokens and TLS files.
    /// Restart-only sections that changed are logged and wait for a restart;
    /// everything else applies now. A bad config file leaves the config in
    /// force, but the tokens and certificates are still re-read.
    pub fn reload(&self) -> Result<bool, String> {
        let result = self.reload_config();
        self.reload_security(true);
        result
    }

    fn reload_config(&self) -> Result<bool, String> {
        match self.config.reload() {
            Ok(change) => {
                self.apply_config();
                self.metrics.config_reloads.with_label_values(&["ok"]).inc();
                if change.requires_restart {
                    tracing::warn!("config reloaded; grpc, admin or state_file changed and take effect after a restart");
                } else {
                    tracing::info!(changed = change.changed, "config reloaded");
                }
                Ok(change.changed)
            }
            Err(errors) => {
                self.metrics
                    .config_reloads
                    .with_label_values(&["failed"])
                    .inc();
                let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
                tracing::error!(errors = %text.join("; "), "config reload refused; the config in force is unchanged");
                Err(text.join("; "))
            }
        }
    }

    /// Updates gauges from the registry and snapshot. It walks every
    /// instance, so it runs when metrics are scraped or sampled and on
    /// reaper changes, never once per registration.
    pub fn refresh_gauges(&self) {
        let snapshot = self.registry.router().load();
        self.metrics
            .routing_generation
            .set(i64::try_from(snapshot.generation).unwrap_or(i64::MAX));
        self.metrics.routes.set(snapshot.routes().count() as i64);
        self.metrics.instances.reset();
        for s in self.registry.summaries() {
            self.metrics
                .instances
                .with_label_values(&[s.module_type.short_name(), s.state.name()])
                .inc();
        }
        self.metrics
            .metric_series
            .set(self.series.series_count() as i64);
    }

    /// The NLB's own status: healthy, degraded (some instances unhealthy, or
    /// the state file cannot be written) or stopping.
    pub fn own_status(&self, census: &Census) -> (HealthStatus, Vec<(String, String)>) {
        let mut checks = Vec::new();
        checks.push((
            "registry".to_string(),
            format!("{} instances, {} healthy", census.instances, census.healthy),
        ));
        let snapshot = self.registry.router().load();
        checks.push((
            "routing".to_string(),
            format!(
                "generation {}, {} routes",
                snapshot.generation,
                snapshot.routes().count()
            ),
        ));
        let state = self.config.state_file();
        let writable = state.writable();
        checks.push((
            "state_file".to_string(),
            if writable {
                format!("{} writable", state.path().display())
            } else {
                format!("{} cannot be written", state.path().display())
            },
        ));
        let status = if self.shutting_down.load(Ordering::Relaxed) {
            HealthStatus::Stopping
        } else if !writable || census.any_unhealthy {
            HealthStatus::Degraded
        } else {
            HealthStatus::Healthy
        };
        (status, checks)
    }

    /// Samples the NLB's own numbers into its time series (for
    /// `GetNLBMetrics` and `StreamNLBMetrics`).
    pub fn own_metric_points(&self) -> Vec<pb::MetricDataPoint> {
        let census = Census::of_summaries(&self.registry.summaries());
        let snapshot = self.registry.router().load();
        let now = shared_types::time::now();
        let point = |name: &str, value: f64| pb::MetricDataPoint {
            name: name.to_string(),
            value,
            labels: Default::default(),
            timestamp: Some(now),
        };
        vec![
            point("nlb_registered_instances", census.instances as f64),
            point("nlb_healthy_instances", census.healthy as f64),
            point("nlb_active_connections", census.active_connections as f64),
            point(
                "nlb_total_requests",
                self.total_requests.load(Ordering::Relaxed) as f64,
            ),
            point("nlb_routing_generation", snapshot.generation as f64),
            point("nlb_routes", snapshot.routes().count() as f64),
            point(
                "nlb_uptime_seconds",
                self.started_at
                    .elapsed()
                    .unwrap_or(Duration::ZERO)
                    .as_secs_f64(),
            ),
        ]
    }

    /// Records the NLB's sample into its series.
    pub fn sample_own_metrics(&self) {
        let points = self.own_metric_points();
        self.series.record(
            NLB_OWNER,
            &points,
            shared_types::time::unix_millis(SystemTime::now()),
        );
    }

    /// Records a heartbeat's stats as series of the instance (labelled
    /// `source=heartbeat`). It runs for every heartbeat, so it builds no
    /// points: the store takes the values as they are.
    pub fn record_heartbeat_stats(&self, instance_id: &str, stats: &pb::ModuleStats) {
        self.series.record_values(
            instance_id,
            &[("source", "heartbeat")],
            &[
                ("active_connections", stats.active_connections as f64),
                ("total_requests", stats.total_requests as f64),
                ("failed_requests", stats.failed_requests as f64),
                ("cpu_usage_percent", stats.cpu_usage_percent),
                ("memory_usage_mb", stats.memory_usage_mb),
                ("avg_latency_ms", stats.avg_latency_ms),
                ("p99_latency_ms", stats.p99_latency_ms),
            ],
            shared_types::time::unix_millis(SystemTime::now()),
        );
    }

    /// Instances (id, ModuleService address) of a type (`Unspecified` = all)
    /// that are not draining.
    pub fn module_addresses(&self, module_type: ModuleType) -> Vec<(String, String, ModuleType)> {
        self.registry
            .list()
            .into_iter()
            .filter(|v| module_type == ModuleType::Unspecified || v.module_type == module_type)
            .filter(|v| v.state != EndpointState::Draining)
            .map(|v| (v.instance.instance_id, v.instance.address, v.module_type))
            .collect()
    }
}
