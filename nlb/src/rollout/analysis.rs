//! Canary analysis: what each version did in one window, from the counters
//! of its instances, and whether the canary is worse than allowed.
//!
//! Per instance the window takes the growth of:
//! - the requests and failed requests it reports: in its heartbeats
//!   (`ModuleStats.total_requests`, `failed_requests`) and through
//!   `ReportMetrics` ([`REPORTED`]), the larger of the two;
//! - the connections the NLB forwarded to it, and those it failed (connects
//!   that failed, connections it reset, or closed without answering a
//!   client that had sent bytes).
//!
//! A version's requests are, per instance, the larger of its requests and
//! its connections (so modules that count no requests are judged by
//! connections), and never fewer than its failures. Its p99 is its
//! instances' latest reported p99, weighted by their requests in the window.

use std::collections::{BTreeMap, HashMap};

use shared_types::pb::MetricDataPoint;

use super::model::{Analysis, Sample};

/// The `ReportMetrics` names the analysis reads: the SDK's
/// (`module_requests_total{result="ok"|"failed"}`,
/// `module_request_latency_ms{quantile="0.99"}`) and, for modules that
/// report their `ModuleStats` under its field names, `total_requests`,
/// `failed_requests` and `p99_latency_ms`.
pub const REPORTED: [&str; 5] = [
    "module_requests_total",
    "module_request_latency_ms",
    "total_requests",
    "failed_requests",
    "p99_latency_ms",
];

/// What an instance's latest `ReportMetrics` points say of its requests.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reported {
    pub requests: u64,
    pub failed_requests: u64,
    pub p99_latency_ms: f64,
}

impl Reported {
    /// Reads the latest point of each series ([`REPORTED`]); points with
    /// other names, and values that are not counts, are ignored.
    pub fn from_points(points: &[MetricDataPoint]) -> Self {
        let count = |v: f64| {
            if v.is_finite() && v > 0.0 {
                v as u64
            } else {
                0
            }
        };
        let (mut sdk_all, mut sdk_failed) = (0u64, 0u64);
        let (mut total, mut failed) = (0u64, 0u64);
        let (mut sdk_p99, mut p99) = (0.0f64, 0.0f64);
        for p in points {
            let label = |k: &str| p.labels.get(k).map(String::as_str);
            match p.name.as_str() {
                "module_requests_total" => {
                    sdk_all += count(p.value);
                    if matches!(label("result"), Some("failed" | "error")) {
                        sdk_failed += count(p.value);
                    }
                }
                "module_request_latency_ms" if label("quantile") == Some("0.99") => {
                    sdk_p99 = p.value;
                }
                "total_requests" => total = total.max(count(p.value)),
                "failed_requests" => failed = failed.max(count(p.value)),
                "p99_latency_ms" => p99 = p.value,
                _ => {}
            }
        }
        let latency = |v: f64| if v.is_finite() && v > 0.0 { v } else { 0.0 };
        Reported {
            requests: sdk_all.max(total),
            failed_requests: sdk_failed.max(failed),
            p99_latency_ms: if latency(sdk_p99) > 0.0 {
                sdk_p99
            } else {
                latency(p99)
            },
        }
    }
}

/// One instance's cumulative counters at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub instance_id: String,
    pub version: String,
    pub requests: u64,
    pub failed_requests: u64,
    pub connections: u64,
    pub failed_connections: u64,
    pub p99_latency_ms: f64,
}

/// Counters at the last window's end, per instance.
#[derive(Debug, Default)]
pub struct Window {
    last: HashMap<String, Probe>,
}

/// Growth of a cumulative counter; a counter that went down (the module
/// restarted) counts from zero.
fn growth(now: u64, before: u64) -> u64 {
    if now >= before {
        now - before
    } else {
        now
    }
}

impl Window {
    /// Closes the window: per version, what its instances did since the
    /// last call. An instance seen for the first time only sets its start.
    pub fn take(&mut self, probes: Vec<Probe>) -> BTreeMap<String, Sample> {
        let mut samples: BTreeMap<String, (Sample, f64)> = BTreeMap::new();
        let mut next = HashMap::with_capacity(probes.len());
        for p in probes {
            let entry = samples.entry(p.version.clone()).or_insert_with(|| {
                (
                    Sample {
                        version: p.version.clone(),
                        ..Sample::default()
                    },
                    0.0,
                )
            });
            entry.0.instances += 1;
            if let Some(before) = self.last.get(&p.instance_id) {
                let failures = growth(p.failed_requests, before.failed_requests)
                    + growth(p.failed_connections, before.failed_connections);
                let requests = growth(p.requests, before.requests)
                    .max(growth(p.connections, before.connections))
                    .max(failures);
                entry.0.requests += requests;
                entry.0.failures += failures;
                if requests > 0 && p.p99_latency_ms.is_finite() && p.p99_latency_ms > 0.0 {
                    entry.1 += p.p99_latency_ms * requests as f64;
                }
            }
            next.insert(p.instance_id.clone(), p);
        }
        self.last = next;
        samples
            .into_values()
            .map(|(mut s, weighted)| {
                if s.requests > 0 {
                    s.p99_latency_ms = weighted / s.requests as f64;
                }
                (s.version.clone(), s)
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Pass,
    /// Worse than allowed: why.
    Fail(String),
    /// Too few samples to judge: why.
    Inconclusive(String),
}

/// Judges the canary's window against the thresholds and the baseline's
/// window. Comparisons with the baseline need the baseline to have had
/// `min_requests` too; absolute thresholds do not.
pub fn judge(a: &Analysis, canary: &Sample, baseline: &Sample) -> Verdict {
    if canary.requests < a.min_requests.max(1) {
        return Verdict::Inconclusive(format!(
            "canary {} had {} requests in the window; {} needed to judge it",
            canary.version, canary.requests, a.min_requests
        ));
    }
    let pct = |r: f64| format!("{:.1}%", r * 100.0);
    let (err, base_err) = (canary.error_rate(), baseline.error_rate());
    if a.max_error_rate > 0.0 && err > a.max_error_rate {
        return Verdict::Fail(format!(
            "canary {} error rate {} ({} of {}) is over the maximum {}",
            canary.version,
            pct(err),
            canary.failures,
            canary.requests,
            pct(a.max_error_rate)
        ));
    }
    let baseline_judged = baseline.requests >= a.min_requests.max(1);
    if a.max_error_rate_increase > 0.0
        && baseline_judged
        && err - base_err > a.max_error_rate_increase
    {
        return Verdict::Fail(format!(
            "canary {} error rate {} is {} points over baseline {}'s {}; at most {} allowed",
            canary.version,
            pct(err),
            pct(err - base_err).trim_end_matches('%'),
            baseline.version,
            pct(base_err),
            pct(a.max_error_rate_increase)
        ));
    }
    if a.max_p99_latency_ms > 0.0 && canary.p99_latency_ms > a.max_p99_latency_ms {
        return Verdict::Fail(format!(
            "canary {} p99 latency {:.1} ms is over the maximum {:.1} ms",
            canary.version, canary.p99_latency_ms, a.max_p99_latency_ms
        ));
    }
    if a.max_p99_latency_ratio > 0.0
        && baseline_judged
        && baseline.p99_latency_ms > 0.0
        && canary.p99_latency_ms > baseline.p99_latency_ms * a.max_p99_latency_ratio
    {
        return Verdict::Fail(format!(
            "canary {} p99 latency {:.1} ms is {:.2}x baseline {}'s {:.1} ms; at most {:.2}x allowed",
            canary.version,
            canary.p99_latency_ms,
            canary.p99_latency_ms / baseline.p99_latency_ms,
            baseline.version,
            baseline.p99_latency_ms,
            a.max_p99_latency_ratio
        ));
    }
    Verdict::Pass
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(id: &str, version: &str, req: u64, failed: u64, conns: u64, p99: f64) -> Probe {
        Probe {
            instance_id: id.into(),
            version: version.into(),
            requests: req,
            failed_requests: failed,
            connections: conns,
            failed_connections: 0,
            p99_latency_ms: p99,
        }
    }

    fn sample(version: &str, requests: u64, failures: u64, p99: f64) -> Sample {
        Sample {
            version: version.into(),
            instances: 1,
            requests,
            failures,
            p99_latency_ms: p99,
        }
    }

    #[test]
    fn a_window_is_the_growth_per_version() {
        let mut w = Window::default();
        let first = w.take(vec![
            probe("a", "v1", 100, 1, 10, 5.0),
            probe("b", "v2", 50, 0, 5, 9.0),
        ]);
        // First sight: instances counted, nothing judged yet.
        assert_eq!(first["v1"].instances, 1);
        assert_eq!(first["v1"].requests, 0);
        let s = w.take(vec![
            probe("a", "v1", 200, 3, 20, 6.0),
            probe("b", "v2", 60, 4, 7, 30.0),
            probe("c", "v2", 10, 0, 1, 10.0),
        ]);
        assert_eq!((s["v1"].requests, s["v1"].failures), (100, 2));
        assert_eq!(
            (s["v2"].requests, s["v2"].failures, s["v2"].instances),
            (10, 4, 2)
        );
        assert!((s["v2"].p99_latency_ms - 30.0).abs() < 1e-9);
        // A restarted module's counters start again from zero.
        let s = w.take(vec![probe("a", "v1", 7, 0, 25, 6.0)]);
        assert_eq!(s["v1"].requests, 7);
    }

    #[test]
    fn connections_stand_in_for_requests_and_failed_connections_count() {
        let mut w = Window::default();
        w.take(vec![probe("a", "tcp", 0, 0, 0, 0.0)]);
        let mut p = probe("a", "tcp", 0, 0, 40, 0.0);
        p.failed_connections = 50;
        let s = w.take(vec![p]);
        assert_eq!((s["tcp"].requests, s["tcp"].failures), (50, 50));
        assert!((s["tcp"].error_rate() - 1.0).abs() < 1e-9);
    }

    fn point(name: &str, labels: &[(&str, &str)], value: f64) -> MetricDataPoint {
        MetricDataPoint {
            name: name.into(),
            value,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            timestamp: None,
        }
    }

    #[test]
    fn reported_metrics_are_read_by_the_sdk_names_and_the_stats_names() {
        let sdk = Reported::from_points(&[
            point("module_requests_total", &[("result", "ok")], 90.0),
            point("module_requests_total", &[("result", "failed")], 10.0),
            point("module_request_latency_ms", &[("quantile", "0.5")], 3.0),
            point("module_request_latency_ms", &[("quantile", "0.99")], 42.0),
            point("module_connections_total", &[], 7.0),
        ]);
        assert_eq!(
            sdk,
            Reported {
                requests: 100,
                failed_requests: 10,
                p99_latency_ms: 42.0
            }
        );
        let stats = Reported::from_points(&[
            point("total_requests", &[], 500.0),
            point("failed_requests", &[], 25.0),
            point("p99_latency_ms", &[], 120.0),
        ]);
        assert_eq!(
            stats,
            Reported {
                requests: 500,
                failed_requests: 25,
                p99_latency_ms: 120.0
            }
        );
        // Nonsense values count as nothing.
        let bad = Reported::from_points(&[
            point("total_requests", &[], f64::NAN),
            point("failed_requests", &[], -3.0),
            point("p99_latency_ms", &[], f64::INFINITY),
        ]);
        assert_eq!(bad, Reported::default());
    }

    #[test]
    fn verdicts() {
        let a = Analysis {
            min_requests: 20,
            max_error_rate: 0.05,
            max_error_rate_increase: 0.02,
            max_p99_latency_ms: 500.0,
            max_p99_latency_ratio: 2.0,
            ..Analysis::default()
        };
        let base = sample("v1", 1000, 10, 40.0);
        assert_eq!(judge(&a, &sample("v2", 100, 1, 50.0), &base), Verdict::Pass);
        let v = judge(&a, &sample("v2", 10, 10, 50.0), &base);
        assert!(
            matches!(v, Verdict::Inconclusive(ref m) if m.contains("10 requests")),
            "{v:?}"
        );
        let v = judge(&a, &sample("v2", 100, 6, 50.0), &base);
        assert!(
            matches!(v, Verdict::Fail(ref m) if m.contains("error rate 6.0%") && m.contains("maximum 5.0%")),
            "{v:?}"
        );
        let v = judge(&a, &sample("v2", 100, 4, 50.0), &base);
        assert!(
            matches!(v, Verdict::Fail(ref m) if m.contains("over baseline v1's 1.0%")),
            "{v:?}"
        );
        let v = judge(&a, &sample("v2", 100, 0, 600.0), &base);
        assert!(
            matches!(v, Verdict::Fail(ref m) if m.contains("p99 latency 600.0 ms is over")),
            "{v:?}"
        );
        let v = judge(&a, &sample("v2", 100, 0, 90.0), &base);
        assert!(
            matches!(v, Verdict::Fail(ref m) if m.contains("2.25x baseline v1's 40.0 ms")),
            "{v:?}"
        );
        // A baseline with too few requests is no yardstick: only the
        // absolute thresholds apply.
        let idle = sample("v1", 3, 0, 1.0);
        assert_eq!(judge(&a, &sample("v2", 100, 4, 90.0), &idle), Verdict::Pass);
    }
}
