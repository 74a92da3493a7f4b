//! `x-request-id` on the control port: every call gets one (the client's,
//! or a generated UUID v4), it comes back in the response headers, and with
//! debug logging each call runs in a span that names its method and id.
//!
//! One small layer instead of tower-http's set, propagate and trace layers:
//! at fleet heartbeat rates those three cost about a tenth of the NLB's CPU
//! (`docs/benchmarks.md`), and the ids need to be unique, not secret, so they
//! come from a fast thread-local generator instead of a system call.

use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderName, HeaderValue};
use tracing::Instrument;

/// The header.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A random UUID v4 as a header value.
pub fn new_id() -> HeaderValue {
    let id = uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes()).into_uuid();
    let mut buf = uuid::Uuid::encode_buffer();
    let text = id.hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(text).expect("a UUID is a valid header value")
}

#[derive(Clone, Copy, Default)]
pub struct RequestIdLayer;

impl<S> tower::Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestIdService { inner }
    }
}

#[derive(Clone)]
pub struct RequestIdService<S> {
    inner: S,
}

type BoxFuture<T, E> = Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for RequestIdService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let id = match req.headers().get(&X_REQUEST_ID) {
            Some(v) => v.clone(),
            None => {
                let v = new_id();
                req.headers_mut().insert(X_REQUEST_ID, v.clone());
                v
            }
        };
        let span = if tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug_span!(
                "grpc",
                method = %req.uri().path(),
                request_id = %id.to_str().unwrap_or("")
            )
        } else {
            tracing::Span::none()
        };
        let fut = self.inner.call(req).instrument(span);
        Box::pin(async move {
            let mut res = fut.await?;
            res.headers_mut().insert(X_REQUEST_ID, id);
            Ok(res)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_distinct_version_4_uuids() {
        let ids: std::collections::HashSet<String> = (0..1000)
            .map(|_| new_id().to_str().unwrap().to_string())
            .collect();
        assert_eq!(ids.len(), 1000);
        for id in ids.iter().take(10) {
            let u = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(u.get_version_num(), 4, "{id}");
        }
    }
}
