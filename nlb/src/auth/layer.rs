//! The tower layer that authenticates every call on the control port and
//! enforces DESIGN.md's role table before the call reaches a handler. The
//! caller's [`Principal`] goes into the request's extensions for the handlers
//! that check more (module tokens bound to their instances, `RouteRequest`
//! dry runs).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::HeaderMap;
use tonic::body::Body;

use prometheus::IntCounterVec;

use super::{need_for, nlb_method, Need};
use crate::audit::{self, Caller, Outcome};
use crate::security::Security;

/// The token a request presents: `authorization: Bearer <token>` first,
/// then `x-api-key: <token>`.
pub fn presented_token(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    bearer.or_else(|| {
        headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    })
}

/// What the layer needs: the security settings and two counters (not the
/// whole NLB, which the per-connection clones of the layer would pin).
#[derive(Clone)]
pub struct AuthLayer {
    security: Arc<Security>,
    /// `nlb_auth_refusals_total`.
    refusals: IntCounterVec,
    /// `nlb_audit_events_total`.
    audit_events: IntCounterVec,
}

impl AuthLayer {
    pub fn new(
        security: Arc<Security>,
        refusals: IntCounterVec,
        audit_events: IntCounterVec,
    ) -> Self {
        AuthLayer {
            security,
            refusals,
            audit_events,
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    layer: AuthLayer,
}

type BoxFuture<T, E> = Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

impl<S> tower::Service<http::Request<Body>> for AuthService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let path = req.uri().path();
        let checked = self
            .layer
            .security
            .auth
            .check(path, presented_token(req.headers()));
        match checked {
            Ok(principal) => {
                req.extensions_mut().insert(principal);
                // The service that was made ready is the one that is called.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(inner.call(req))
            }
            Err(refusal) => {
                let method = nlb_method(path).unwrap_or(path).to_string();
                self.layer
                    .refusals
                    .with_label_values(&[refusal.reason()])
                    .inc();
                let status = refusal.to_status(&method);
                if need_for(path) == Need::Operator || audit::AUDITED.contains(&method.as_str()) {
                    let req = tonic::Request::from_http(req.map(|_| ()));
                    let caller = Caller {
                        principal: refusal.caller(),
                        ..Caller::of(&req)
                    };
                    audit::record(
                        &self.layer.audit_events,
                        &caller,
                        &method,
                        &method,
                        &Outcome::Denied(status.message().to_string()),
                    );
                }
                tracing::debug!(%method, reason = refusal.reason(), "control API call refused");
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn bearer_and_api_key_are_both_read() {
        assert_eq!(
            presented_token(&headers(&[("authorization", "Bearer abc")])),
            Some("abc")
        );
        assert_eq!(
            presented_token(&headers(&[("authorization", "bearer  abc ")])),
            Some("abc")
        );
        assert_eq!(
            presented_token(&headers(&[("x-api-key", "k1")])),
            Some("k1")
        );
        assert_eq!(
            presented_token(&headers(&[
                ("authorization", "Basic eA=="),
                ("x-api-key", "k1")
            ])),
            Some("k1")
        );
        assert_eq!(
            presented_token(&headers(&[("authorization", "Basic eA==")])),
            None
        );
        assert_eq!(presented_token(&headers(&[])), None);
    }
}
