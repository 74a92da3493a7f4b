//! The NLB's Prometheus metrics (served on the admin port) and the bounded
//! time-series store behind `ReportMetrics` and `Get*Metrics`. Every metric is
//! documented in `docs/metrics.md`; no label carries a client address or an
//! instance id.

pub mod grpc;
pub mod series;

use prometheus::{
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry as PromRegistry,
};

pub use grpc::GrpcMetrics;
pub use series::SeriesStore;

use std::sync::Arc;

/// The NLB's own metrics.
pub struct NlbMetrics {
    pub prometheus: PromRegistry,
    /// `nlb_registrations_total{result}`: registered, renewed, refused.
    pub registrations: IntCounterVec,
    /// `nlb_unregistrations_total{mode}`: graceful, immediate.
    pub unregistrations: IntCounterVec,
    /// `nlb_heartbeats_total{result}`: ok, reregister.
    pub heartbeats: IntCounterVec,
    /// `nlb_lease_lapses_total`.
    pub lease_lapses: IntCounter,
    /// `nlb_instances_removed_total{reason}`: unregistered, expired.
    pub removals: IntCounterVec,
    /// `nlb_instances{module_type,state}`.
    pub instances: IntGaugeVec,
    /// `nlb_health_checks_total{result}`: pass, fail.
    pub health_checks: IntCounterVec,
    /// `nlb_route_requests_total{result}`: routed, no_route, no_server (dry runs are not counted).
    pub route_requests: IntCounterVec,
    /// `nlb_routing_generation`.
    pub routing_generation: IntGauge,
    /// `nlb_routes`.
    pub routes: IntGauge,
    /// `nlb_config_updates_total{result}`: applied, validated, refused.
    pub config_updates: IntCounterVec,
    /// `nlb_config_reloads_total{result}`: ok, failed.
    pub config_reloads: IntCounterVec,
    /// `nlb_metric_reports_total{result}`: accepted, refused.
    pub metric_reports: IntCounterVec,
    /// `nlb_metric_series`.
    pub metric_series: IntGauge,
    /// `nlb_grpc_requests_total{service,method,code}` and
    /// `nlb_grpc_request_duration_seconds{service,method}`.
    pub grpc: Arc<GrpcMetrics>,
    /// `nlb_auth_enabled`: 1 when tokens are required.
    pub auth_enabled: IntGauge,
    /// `nlb_auth_refusals_total{reason}`: missing_token, invalid_token,
    /// permission_denied.
    pub auth_refusals: IntCounterVec,
    /// `nlb_auth_reloads_total{result}`: ok, failed.
    pub auth_reloads: IntCounterVec,
    /// `nlb_tls_reloads_total{port,result}`: grpc/admin, ok/failed.
    pub tls_reloads: IntCounterVec,
    /// `nlb_audit_events_total{method,result}`: operator changes by
    /// method and ok, failed, denied.
    pub audit_events: IntCounterVec,
    /// `nlb_rollout_events_total{module_type,kind}`: rollout events
    /// (started, step_started, analysis_passed, analysis_failed,
    /// rolled_back, succeeded, ...).
    pub rollout_events: IntCounterVec,
    /// `nlb_rollout_canary_weight{module_type}`: the canary's percent of
    /// new connections in the type's latest rollout.
    pub rollout_canary_weight: IntGaugeVec,
    /// `nlb_scaling_decisions_total{module,direction,result}`.
    pub scaling_decisions: IntCounterVec,
    /// `nlb_scaling_recommended_instances{module}`: the autoscaler's
    /// latest recommendation.
    pub scaling_recommended: IntGaugeVec,
}

fn counter_vec(reg: &PromRegistry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    reg.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

impl NlbMetrics {
    pub fn new() -> Self {
        let reg = PromRegistry::new();
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            reg.register(Box::new(g.clone()))
                .expect("metric registered once");
            g
        };
        let lease_lapses = IntCounter::new(
            "nlb_lease_lapses_total",
            "Instances whose heartbeat lease lapsed (they stop taking new connections)",
        )
        .expect("valid metric");
        reg.register(Box::new(lease_lapses.clone()))
            .expect("metric registered once");
        let instances = IntGaugeVec::new(
            Opts::new(
                "nlb_instances",
                "Registered module instances by type and state",
            ),
            &["module_type", "state"],
        )
        .expect("valid metric");
        reg.register(Box::new(instances.clone()))
            .expect("metric registered once");
        NlbMetrics {
            registrations: counter_vec(
                &reg,
                "nlb_registrations_total",
                "RegisterModule calls by result",
                &["result"],
            ),
            unregistrations: counter_vec(
                &reg,
                "nlb_unregistrations_total",
                "UnregisterModule calls by mode",
                &["mode"],
            ),
            heartbeats: counter_vec(
                &reg,
                "nlb_heartbeats_total",
                "Heartbeats by result",
                &["result"],
            ),
            lease_lapses,
            removals: counter_vec(
                &reg,
                "nlb_instances_removed_total",
                "Instances removed from the registry by reason",
                &["reason"],
            ),
            instances,
            health_checks: counter_vec(
                &reg,
                "nlb_health_checks_total",
                "Active HealthCheck calls to modules by result",
                &["result"],
            ),
            route_requests: counter_vec(
                &reg,
                "nlb_route_requests_total",
                "RouteRequest calls by result",
                &["result"],
            ),
            routing_generation: gauge(
                "nlb_routing_generation",
                "Generation of the routing snapshot in force",
            ),
            routes: gauge("nlb_routes", "Routes in the routing snapshot in force"),
            config_updates: counter_vec(
                &reg,
                "nlb_config_updates_total",
                "Config changes through the API by result",
                &["result"],
            ),
            config_reloads: counter_vec(
                &reg,
                "nlb_config_reloads_total",
                "Config file reloads (SIGHUP) by result",
                &["result"],
            ),
            metric_reports: counter_vec(
                &reg,
                "nlb_metric_reports_total",
                "ReportMetrics calls by result",
                &["result"],
            ),
            metric_series: gauge(
                "nlb_metric_series",
                "Time series held: module reports, heartbeat samples and the NLB's own",
            ),
            grpc: Arc::new(GrpcMetrics::new(
                &reg,
                &[
                    shared_types::FILE_DESCRIPTOR_SET,
                    tonic_health::pb::FILE_DESCRIPTOR_SET,
                ],
            )),
            auth_enabled: gauge(
                "nlb_auth_enabled",
                "1 when the control API requires tokens, 0 when it is open",
            ),
            auth_refusals: counter_vec(
                &reg,
                "nlb_auth_refusals_total",
                "Control API calls refused by authentication or authorization, by reason",
                &["reason"],
            ),
            auth_reloads: counter_vec(
                &reg,
                "nlb_auth_reloads_total",
                "Tokens file reloads by result",
                &["result"],
            ),
            tls_reloads: counter_vec(
                &reg,
                "nlb_tls_reloads_total",
                "Certificate and key reloads by port and result",
                &["port", "result"],
            ),
            audit_events: counter_vec(
                &reg,
                "nlb_audit_events_total",
                "Operator changes through the control API, by method and result",
                &["method", "result"],
            ),
            rollout_events: counter_vec(
                &reg,
                "nlb_rollout_events_total",
                "Rollout events by module type and kind",
                &["module_type", "kind"],
            ),
            scaling_decisions: counter_vec(
                &reg,
                "nlb_scaling_decisions_total",
                "Autoscaler decisions by module, direction (up, down) and result (ok, failed)",
                &["module", "direction", "result"],
            ),
            scaling_recommended: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "nlb_scaling_recommended_instances",
                        "The autoscaler's latest recommended instance count per module",
                    ),
                    &["module"],
                )
                .expect("valid metric");
                reg.register(Box::new(g.clone()))
                    .expect("metric registered once");
                g
            },
            rollout_canary_weight: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "nlb_rollout_canary_weight",
                        "The canary's percent of new connections in each module type's latest rollout",
                    ),
                    &["module_type"],
                )
                .expect("valid metric");
                reg.register(Box::new(g.clone()))
                    .expect("metric registered once");
                g
            },
            prometheus: reg,
        }
        .with_known_labels()
    }

    /// Creates every known label value at zero, so dashboards and alerts see
    /// a series before its first event.
    fn with_known_labels(self) -> Self {
        let known: [(&IntCounterVec, &[&str]); 11] = [
            (&self.registrations, &["registered", "renewed", "refused"]),
            (&self.unregistrations, &["graceful", "immediate"]),
            (&self.heartbeats, &["ok", "reregister"]),
            (&self.removals, &["unregistered", "expired"]),
            (&self.health_checks, &["pass", "fail"]),
            (&self.route_requests, &["routed", "no_route", "no_server"]),
            (&self.config_updates, &["applied", "validated", "refused"]),
            (&self.config_reloads, &["ok", "failed"]),
            (&self.metric_reports, &["accepted", "refused"]),
            (
                &self.auth_refusals,
                &["missing_token", "invalid_token", "permission_denied"],
            ),
            (&self.auth_reloads, &["ok", "failed"]),
        ];
        for (vec, values) in known {
            for v in values {
                vec.with_label_values(&[v]);
            }
        }
        for port in ["grpc", "admin"] {
            for result in ["ok", "failed"] {
                self.tls_reloads.with_label_values(&[port, result]);
            }
        }
        self
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        if encoder.encode(&self.prometheus.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for NlbMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_documented() {
        let m = NlbMetrics::new();
        // Vectors without a series are not gathered: give each one.
        m.instances.with_label_values(&["alb", "healthy"]).set(1);
        m.audit_events.with_label_values(&["other", "ok"]).inc();
        let slot = m.grpc.slot("/x/y");
        m.grpc
            .record(slot, tonic::Code::Ok, std::time::Duration::ZERO);
        let doc = include_str!("../../../docs/metrics.md");
        let names: Vec<String> = m
            .prometheus
            .gather()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        assert!(names.len() >= 20, "{names:?}");
        for name in names {
            assert!(
                doc.contains(&format!("| `{name}` |")),
                "{name} is not in docs/metrics.md"
            );
        }
    }

    #[test]
    fn every_counter_shows_its_known_labels_at_zero() {
        let text = NlbMetrics::new().render();
        for line in [
            "nlb_registrations_total{result=\"registered\"} 0",
            "nlb_heartbeats_total{result=\"reregister\"} 0",
            "nlb_config_reloads_total{result=\"failed\"} 0",
            "nlb_route_requests_total{result=\"no_server\"} 0",
            "nlb_instances_removed_total{reason=\"expired\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
