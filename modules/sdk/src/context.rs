//! What a module's code may use while it serves: its identity, its stats,
//! the rate limiter, and the SDK's own counters.

use std::sync::Arc;

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::ratelimit::RateLimiter;
use crate::stats::Stats;

/// Shared by every connection of a module.
pub struct Context {
    /// This instance's id, as registered.
    pub instance_id: String,
    /// The version this instance runs.
    pub version: String,
    /// Traffic statistics: record each request here.
    pub stats: Arc<Stats>,
    /// Rate limits set through `SetRateLimit`: check requests here.
    pub limits: Arc<RateLimiter>,
    /// The Prometheus registry `/metrics` serves; a module may register its
    /// own `module_*` metrics in it.
    pub registry: Registry,
    pub(crate) counters: Counters,
    stopping: tokio::sync::watch::Sender<bool>,
}

/// The SDK's own metrics.
pub(crate) struct Counters {
    pub refused_full: IntCounter,
    pub bad_proxy_header: IntCounter,
    pub shed: IntCounter,
    pub registered: IntGauge,
    pub registrations: IntCounterVec,
    pub heartbeats: IntCounterVec,
    pub instructions: IntCounterVec,
    pub reports: IntCounterVec,
}

impl Counters {
    fn new(registry: &Registry) -> prometheus::Result<Self> {
        let refused = IntCounterVec::new(
            Opts::new(
                "module_refused_connections_total",
                "Data connections closed before the module saw them, by reason",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(refused.clone()))?;
        let c = Counters {
            refused_full: refused.with_label_values(&["max_connections"]),
            bad_proxy_header: refused.with_label_values(&["proxy_header"]),
            shed: IntCounter::new(
                "module_shed_connections_total",
                "Connections asked to finish because the NLB said shed",
            )?,
            registered: IntGauge::new(
                "module_registered",
                "1 while the NLB has this instance registered",
            )?,
            registrations: IntCounterVec::new(
                Opts::new(
                    "module_registrations_total",
                    "RegisterModule calls, by result",
                ),
                &["result"],
            )?,
            heartbeats: IntCounterVec::new(
                Opts::new("module_heartbeats_total", "Heartbeats sent, by result"),
                &["result"],
            )?,
            instructions: IntCounterVec::new(
                Opts::new(
                    "module_instructions_total",
                    "Heartbeat instructions followed, by action",
                ),
                &["action"],
            )?,
            reports: IntCounterVec::new(
                Opts::new(
                    "module_metric_reports_total",
                    "ReportMetrics calls, by result",
                ),
                &["result"],
            )?,
        };
        registry.register(Box::new(c.shed.clone()))?;
        registry.register(Box::new(c.registered.clone()))?;
        registry.register(Box::new(c.registrations.clone()))?;
        registry.register(Box::new(c.heartbeats.clone()))?;
        registry.register(Box::new(c.instructions.clone()))?;
        registry.register(Box::new(c.reports.clone()))?;
        for r in ["ok", "error"] {
            c.registrations.with_label_values(&[r]);
            c.reports.with_label_values(&[r]);
        }
        for r in ["ok", "rejected", "error"] {
            c.heartbeats.with_label_values(&[r]);
        }
        for a in ["reregister", "reload", "drain", "shed"] {
            c.instructions.with_label_values(&[a]);
        }
        Ok(c)
    }
}

impl Context {
    /// Turns true when the module starts to stop: background tasks a module
    /// started end on it.
    pub fn stopping(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stopping.subscribe()
    }

    pub(crate) fn set_stopping(&self) {
        self.stopping.send_replace(true);
    }

    pub(crate) fn new(instance_id: String, version: String) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let stats = Stats::new(&registry)?;
        let counters = Counters::new(&registry)?;
        Ok(Context {
            instance_id,
            version,
            stats,
            limits: Arc::new(RateLimiter::new()),
            registry,
            counters,
            stopping: tokio::sync::watch::Sender::new(false),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_documented_in_docs_modules_md() {
        let ctx = Context::new("i".into(), "1".into()).unwrap();
        let doc = include_str!("../../../docs/modules.md");
        let names: Vec<String> = ctx
            .registry
            .gather()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        assert!(names.len() >= 14, "{names:?}");
        for name in names {
            assert!(name.starts_with("module_"), "{name}");
            assert!(
                doc.contains(&format!("| `{name}` |")),
                "{name} is not in docs/modules.md"
            );
        }
    }
}
