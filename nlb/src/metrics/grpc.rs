//! gRPC server metrics for the control port: requests by service, method and
//! status code, and a latency histogram by service and method.
//!
//! The latency runs from the request's arrival to the end of its response
//! (the trailers), so a stream counts its whole life. Method labels come from
//! the served protos (every service and method of the file descriptor sets),
//! so a client inventing paths cannot grow the label set: unknown paths are
//! `other`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body::{Body as HttpBody, Frame, SizeHint};
use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts};
use prost::Message;
use shared_types::error::code_name;
use tonic::body::Body;
use tonic::codegen::Bytes;
use tonic::{Code, Status};

/// Latency buckets, in seconds: sub-millisecond reads up to slow module calls.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

struct Slot {
    service: String,
    method: String,
    duration: OnceLock<Histogram>,
    /// The `OK` counter, the common case, resolved once.
    ok: OnceLock<IntCounter>,
}

/// The control port's request metrics.
pub struct GrpcMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    /// `/service/method` -> slot; the last slot is `other`.
    index: HashMap<String, usize>,
    slots: Vec<Slot>,
}

/// Every `/package.Service/Method` path in encoded file descriptor sets.
pub fn method_paths(descriptor_sets: &[&[u8]]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for bytes in descriptor_sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(*bytes) else {
            continue;
        };
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let name = service.name.unwrap_or_default();
                let full = if package.is_empty() {
                    name
                } else {
                    format!("{package}.{name}")
                };
                for m in service.method {
                    out.push((full.clone(), m.name.unwrap_or_default()));
                }
            }
        }
    }
    out
}

impl GrpcMetrics {
    /// Registers the metrics, knowing the methods of `descriptor_sets`
    /// (plus server reflection, whose descriptors are not ours).
    pub fn new(reg: &prometheus::Registry, descriptor_sets: &[&[u8]]) -> Self {
        let requests = IntCounterVec::new(
            Opts::new(
                "nlb_grpc_requests_total",
                "Control API calls by service, method and status code",
            ),
            &["service", "method", "code"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "nlb_grpc_request_duration_seconds",
                "Control API call latency, from the request to the end of the response",
            )
            .buckets(BUCKETS.to_vec()),
            &["service", "method"],
        )
        .expect("valid metric");
        reg.register(Box::new(requests.clone()))
            .expect("metric registered once");
        reg.register(Box::new(duration.clone()))
            .expect("metric registered once");
        let mut known = method_paths(descriptor_sets);
        for service in [
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ] {
            known.push((service.to_string(), "ServerReflectionInfo".to_string()));
        }
        known.push(("other".into(), "other".into()));
        let mut index = HashMap::new();
        let mut slots = Vec::new();
        for (service, method) in known {
            let path = format!("/{service}/{method}");
            if index.contains_key(&path) {
                continue;
            }
            index.insert(path, slots.len());
            slots.push(Slot {
                service,
                method,
                duration: OnceLock::new(),
                ok: OnceLock::new(),
            });
        }
        GrpcMetrics {
            requests,
            duration,
            index,
            slots,
        }
    }

    /// The slot of a request path (`other` when unknown).
    pub fn slot(&self, path: &str) -> usize {
        self.index
            .get(path)
            .copied()
            .unwrap_or(self.slots.len() - 1)
    }

    /// Records one finished call.
    pub fn record(&self, slot: usize, code: Code, elapsed: Duration) {
        let s = &self.slots[slot];
        s.duration
            .get_or_init(|| self.duration.with_label_values(&[&s.service, &s.method]))
            .observe(elapsed.as_secs_f64());
        let label = |code| {
            self.requests
                .with_label_values(&[&s.service, &s.method, code_name(code)])
        };
        if code == Code::Ok {
            s.ok.get_or_init(|| label(Code::Ok)).inc();
        } else {
            label(code).inc();
        }
    }
}

/// A tower layer that records every call in [`GrpcMetrics`].
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    metrics: Arc<GrpcMetrics>,
}

impl GrpcMetricsLayer {
    pub fn new(metrics: Arc<GrpcMetrics>) -> Self {
        GrpcMetricsLayer { metrics }
    }
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: Arc::clone(&self.metrics),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Arc<GrpcMetrics>,
}

type BoxFuture<T, E> = Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

impl<S> tower::Service<http::Request<Body>> for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let start = Instant::now();
        let slot = self.metrics.slot(req.uri().path());
        let metrics = Arc::clone(&self.metrics);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await?;
            // A trailers-only answer (every error tonic returns) carries its
            // status in the headers.
            let code = Status::from_header_map(res.headers()).map(|s| s.code());
            let pending = Pending {
                metrics,
                slot,
                start,
                code,
            };
            Ok(res.map(|inner| {
                Body::new(MeteredBody {
                    inner,
                    pending: Some(pending),
                })
            }))
        })
    }
}

struct Pending {
    metrics: Arc<GrpcMetrics>,
    slot: usize,
    start: Instant,
    code: Option<Code>,
}

impl Pending {
    fn finish(self, code: Code) {
        self.metrics.record(self.slot, code, self.start.elapsed());
    }
}

/// A response body that records its call when the trailers pass, the body
/// fails, or it is dropped unfinished (the client went away: `CANCELLED`).
struct MeteredBody {
    inner: Body,
    pending: Option<Pending>,
}

impl MeteredBody {
    fn finish(&mut self, code: Code) {
        if let Some(p) = self.pending.take() {
            p.finish(code);
        }
    }
}

impl HttpBody for MeteredBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code =
                        Status::from_header_map(trailers).map_or(Code::Unknown, |s| s.code());
                    this.finish(code);
                }
            }
            Poll::Ready(Some(Err(status))) => this.finish(status.code()),
            Poll::Ready(None) => {
                let code = this
                    .pending
                    .as_ref()
                    .and_then(|p| p.code)
                    .unwrap_or(Code::Ok);
                this.finish(code);
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        let code = match &self.pending {
            Some(p) => p.code.unwrap_or(Code::Cancelled),
            None => return,
        };
        self.finish(code);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_come_from_the_descriptors_and_unknown_paths_are_other() {
        let reg = prometheus::Registry::new();
        let m = GrpcMetrics::new(
            &reg,
            &[
                shared_types::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
            ],
        );
        let hb = m.slot("/marchproxy.NLBService/Heartbeat");
        let check = m.slot("/grpc.health.v1.Health/Check");
        let other = m.slot("/marchproxy.NLBService/NoSuchMethod");
        assert_ne!(hb, other);
        assert_ne!(check, other);
        assert_eq!(other, m.slot("/x/y"));
        assert_ne!(m.slot("/marchproxy.ModuleService/Scale"), other);
        m.record(hb, Code::Ok, Duration::from_millis(2));
        m.record(hb, Code::Ok, Duration::from_millis(3));
        m.record(other, Code::Unimplemented, Duration::from_millis(1));
        let text = {
            use prometheus::Encoder;
            let mut buf = Vec::new();
            prometheus::TextEncoder::new()
                .encode(&reg.gather(), &mut buf)
                .unwrap();
            String::from_utf8(buf).unwrap()
        };
        assert!(text.contains(
            "nlb_grpc_requests_total{code=\"OK\",method=\"Heartbeat\",service=\"marchproxy.NLBService\"} 2"
        ), "{text}");
        assert!(text.contains(
            "nlb_grpc_requests_total{code=\"UNIMPLEMENTED\",method=\"other\",service=\"other\"} 1"
        ), "{text}");
        assert!(text.contains(
            "nlb_grpc_request_duration_seconds_count{method=\"Heartbeat\",service=\"marchproxy.NLBService\"} 2"
        ), "{text}");
    }
}
