//! The module's metrics as the contract's `ModuleMetrics`: every sample of
//! the Prometheus registry `/metrics` serves (counters and gauges as they
//! are, histograms as `_count` and `_sum`), plus the latency percentiles of
//! the recent window. `GetMetrics`, `StreamMetrics` and `ReportMetrics` all
//! use it, so they agree with `/metrics`.

use std::collections::HashMap;

use prometheus::proto::MetricType;
use shared_types::pb::{MetricDataPoint, ModuleMetrics};

use crate::runtime::Shared;

/// The metrics named in `names` (all when empty), now.
pub fn module_metrics(shared: &Shared, names: &[String]) -> ModuleMetrics {
    let now = shared_types::time::now();
    let wanted = |n: &str| names.is_empty() || names.iter().any(|w| w == n);
    let mut points = Vec::new();
    let mut push = |name: String, value: f64, labels: HashMap<String, String>| {
        if wanted(&name) && value.is_finite() {
            points.push(MetricDataPoint {
                name,
                value,
                labels,
                timestamp: Some(now),
            });
        }
    };
    shared.ctx.stats.refresh_process_gauges();
    for family in shared.ctx.registry.gather() {
        let name = family.name();
        for m in family.get_metric() {
            let labels: HashMap<String, String> = m
                .get_label()
                .iter()
                .map(|l| (l.name().to_string(), l.value().to_string()))
                .collect();
            match family.get_field_type() {
                MetricType::COUNTER => push(name.to_string(), m.get_counter().get_value(), labels),
                MetricType::GAUGE => push(name.to_string(), m.get_gauge().get_value(), labels),
                MetricType::HISTOGRAM => {
                    let h = m.get_histogram();
                    push(
                        format!("{name}_count"),
                        h.get_sample_count() as f64,
                        labels.clone(),
                    );
                    push(format!("{name}_sum"), h.get_sample_sum(), labels);
                }
                _ => {}
            }
        }
    }
    let stats = shared.ctx.stats.snapshot(&shared.ctx.instance_id);
    for (q, v) in [
        ("0.5", stats.p50_latency_ms),
        ("0.95", stats.p95_latency_ms),
        ("0.99", stats.p99_latency_ms),
    ] {
        push(
            "module_request_latency_ms".into(),
            v,
            HashMap::from([("quantile".to_string(), q.to_string())]),
        );
    }
    ModuleMetrics {
        instance_id: shared.ctx.instance_id.clone(),
        module_type: shared.descriptor.module_type as i32,
        metrics: points,
        collected_at: Some(now),
    }
}
