//! The ALB's Prometheus metrics, served with the SDK's `module_*` ones on
//! the admin port. Labels are route ids and cluster names from the config
//! (bounded by it) and fixed sets; never a client address or a path.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

pub struct AlbMetrics {
    /// `route`, `class` (`1xx` .. `5xx`).
    pub requests: IntCounterVec,
    /// `route`.
    pub duration: HistogramVec,
    /// `cluster`, `kind` (`connect`, `timeout`, `protocol`).
    pub upstream_errors: IntCounterVec,
    /// `cluster`.
    pub retries: IntCounterVec,
    /// `result` (`ok`, `failed`).
    pub tls_reloads: IntCounterVec,
    /// `reason` (`no_route`, `rate_limited`, `body_too_large`,
    /// `no_cluster`, `no_endpoint`, `tls_handshake`, `header_timeout`,
    /// `header_too_large`, `client_body`, `method`).
    pub refused: IntCounterVec,
    /// `refused{reason="header_timeout"}`, resolved once: every connection
    /// holds it (a label lookup hashes and locks).
    pub refused_header_timeout: prometheus::IntCounter,
}

impl AlbMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let refused = IntCounterVec::new(
            Opts::new(
                "alb_refused_total",
                "Requests and connections the ALB answered itself, by reason",
            ),
            &["reason"],
        )?;
        let m = AlbMetrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "alb_requests_total",
                    "Requests answered, by route and status class",
                ),
                &["route", "class"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "alb_request_duration_seconds",
                    "Time from a request's headers to its response's headers, by route",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0,
                ]),
                &["route"],
            )?,
            upstream_errors: IntCounterVec::new(
                Opts::new(
                    "alb_upstream_errors_total",
                    "Upstream attempts that failed, by cluster and kind",
                ),
                &["cluster", "kind"],
            )?,
            retries: IntCounterVec::new(
                Opts::new("alb_retries_total", "Requests retried on another endpoint"),
                &["cluster"],
            )?,
            tls_reloads: IntCounterVec::new(
                Opts::new(
                    "alb_tls_reloads_total",
                    "Certificate reloads after their files changed, by result",
                ),
                &["result"],
            )?,
            refused_header_timeout: refused.with_label_values(&["header_timeout"]),
            refused,
        };

        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        registry.register(Box::new(m.upstream_errors.clone()))?;
        registry.register(Box::new(m.retries.clone()))?;
        registry.register(Box::new(m.refused.clone()))?;
        registry.register(Box::new(m.tls_reloads.clone()))?;
        for r in ["ok", "failed"] {
            m.tls_reloads.with_label_values(&[r]);
        }
        for r in [
            "no_route",
            "rate_limited",
            "body_too_large",
            "no_cluster",
            "no_endpoint",
            "tls_handshake",
            "header_timeout",
            "header_too_large",
            "client_body",
            "method",
            "bad_request",
        ] {
            m.refused.with_label_values(&[r]);
        }
        Ok(m)
    }
}

/// One route's series, resolved once per route table rather than per
/// request (a label lookup hashes and locks).
#[derive(Debug)]
pub struct RouteMetrics {
    by_class: [prometheus::IntCounter; 5],
    duration: prometheus::Histogram,
}

impl RouteMetrics {
    pub fn new(m: &AlbMetrics, route: &str) -> Self {
        let c = |class| m.requests.with_label_values(&[route, class]);
        RouteMetrics {
            by_class: [c("1xx"), c("2xx"), c("3xx"), c("4xx"), c("5xx")],
            duration: m.duration.with_label_values(&[route]),
        }
    }

    pub fn record(&self, status: u16, seconds: f64) {
        let i = match status {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        };
        self.by_class[i].inc();
        self.duration.observe(seconds);
    }
}

/// `2xx` for 200, and so on.
pub fn class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_documented_in_docs_alb_md() {
        let registry = Registry::new();
        let m = AlbMetrics::new(&registry).unwrap();
        RouteMetrics::new(&m, "r").record(200, 0.1);
        m.upstream_errors.with_label_values(&["c", "connect"]).inc();
        m.retries.with_label_values(&["c"]).inc();
        let doc = include_str!("../../../docs/alb.md");
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        assert_eq!(names.len(), 6, "{names:?}");
        for name in names {
            assert!(
                doc.contains(&format!("| `{name}` |")),
                "{name} is not in docs/alb.md"
            );
        }
    }

    #[test]
    fn route_series_count_by_class() {
        let registry = Registry::new();
        let m = AlbMetrics::new(&registry).unwrap();
        let r = RouteMetrics::new(&m, "api");
        for s in [200, 204, 404, 503, 101] {
            r.record(s, 0.001);
        }
        let get = |class| m.requests.with_label_values(&["api", class]).get();
        assert_eq!(
            (get("1xx"), get("2xx"), get("4xx"), get("5xx")),
            (1, 2, 1, 1)
        );
        assert_eq!(class(302), "3xx");
    }
}
