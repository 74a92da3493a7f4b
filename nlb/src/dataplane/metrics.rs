//! The data plane's metrics (named in docs/metrics.md). Labels
//! are bounded: listener names come from the config, protocols and module
//! types from fixed lists, reasons and outcomes from this file.

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// Every data-plane metric.
pub struct DataplaneMetrics {
    /// `nlb_connections_total{listener,protocol,module}`: connections
    /// forwarded (module: the module type, `backend` for a static pool).
    pub connections: IntCounterVec,
    /// `nlb_active_connections{listener}`.
    pub active: IntGaugeVec,
    /// `nlb_connections_open`: over all listeners (the global cap's count).
    pub open: IntGauge,
    /// `nlb_data_thread_connections{thread}`: connections served by each
    /// data thread (bounded by the thread count).
    pub threads: IntGaugeVec,
    /// `nlb_bytes_total{listener,direction}`: `upstream` (client to
    /// instance) and `downstream`.
    pub bytes: IntCounterVec,
    /// `nlb_sniff_total{listener,outcome}`: the family found, or
    /// `no_match`, `timeout`, `closed`.
    pub sniff: IntCounterVec,
    /// `nlb_connect_failures_total{module}`.
    pub connect_failures: IntCounterVec,
    /// `nlb_ejections_total{module}`.
    pub ejections: IntCounterVec,
    /// `nlb_instance_failures_total{module,kind}`: proxied connections an
    /// instance failed (`reset`, `unanswered`).
    pub instance_failures: IntCounterVec,
    /// `nlb_rejected_connections_total{listener,reason}`.
    pub rejected: IntCounterVec,
    /// `nlb_listener_errors_total{listener}`: accept or bind failures.
    pub listener_errors: IntCounterVec,
}

impl DataplaneMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let active = IntGaugeVec::new(
            Opts::new(
                "nlb_active_connections",
                "Connections open on the listener.",
            ),
            &["listener"],
        )?;
        registry.register(Box::new(active.clone()))?;
        let open = IntGauge::new(
            "nlb_connections_open",
            "Connections open over all listeners.",
        )?;
        registry.register(Box::new(open.clone()))?;
        let threads = IntGaugeVec::new(
            Opts::new(
                "nlb_data_thread_connections",
                "Connections open on each data thread.",
            ),
            &["thread"],
        )?;
        registry.register(Box::new(threads.clone()))?;
        Ok(DataplaneMetrics {
            connections: counter(
                "nlb_connections_total",
                "Connections forwarded, by listener, protocol and module type.",
                &["listener", "protocol", "module"],
            )?,
            active,
            open,
            threads,
            bytes: counter(
                "nlb_bytes_total",
                "Bytes forwarded: upstream (client to instance) and downstream.",
                &["listener", "direction"],
            )?,
            sniff: counter(
                "nlb_sniff_total",
                "Protocol detection outcomes on auto listeners.",
                &["listener", "outcome"],
            )?,
            connect_failures: counter(
                "nlb_connect_failures_total",
                "Failed connects to instances and backends, by module type.",
                &["module"],
            )?,
            ejections: counter(
                "nlb_ejections_total",
                "Instances and backends ejected after consecutive connect failures.",
                &["module"],
            )?,
            instance_failures: counter(
                "nlb_instance_failures_total",
                "Forwarded connections an instance reset or ended without answering, by module type.",
                &["module", "kind"],
            )?,
            rejected: counter(
                "nlb_rejected_connections_total",
                "Connections closed before forwarding, by listener and reason.",
                &["listener", "reason"],
            )?,
            listener_errors: counter(
                "nlb_listener_errors_total",
                "Bind and accept failures, by listener.",
                &["listener"],
            )?,
        })
    }
}
