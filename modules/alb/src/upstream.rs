//! Upstream clusters at run time: each cluster with a pool of connections
//! per endpoint (keep-alive, HTTP/1.1 or HTTP/2, optional TLS with a client
//! certificate) and its active health checks.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use tokio::sync::watch;

use crate::cluster::{Cluster, ClusterSpec, Endpoint, UpstreamProtocol};
use crate::pool::{Connector, EndpointPool};

/// Request and response bodies through the proxy.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// A request on its way to an endpoint. To an HTTP/1.1 origin its head
/// may go as bytes made by the proxy (`head`): the request line and its
/// fields, but not its framing (`Content-Length`, `Transfer-Encoding`)
/// nor the blank line; the request's header map (empty) is then not
/// looked at. It saves making a second header map from the client's only
/// to encode it.
pub struct Outgoing {
    pub req: http::Request<ProxyBody>,
    pub head: Option<Vec<u8>>,
}

impl From<http::Request<ProxyBody>> for Outgoing {
    /// A request whose head is its header map.
    fn from(req: http::Request<ProxyBody>) -> Self {
        Outgoing { req, head: None }
    }
}

/// A cluster and how to reach it.
pub struct Upstream {
    pub cluster: Arc<Cluster>,
    /// Each endpoint's connections, by endpoint index.
    pub pools: Vec<Arc<EndpointPool>>,
    /// `http` or `https`.
    pub scheme: http::uri::Scheme,
    pub protocol: UpstreamProtocol,
    pub request_timeout: Duration,
    /// Each endpoint's address as a URI authority, by endpoint index (HTTP/2
    /// requests carry it as `:authority`).
    pub authorities: Vec<http::uri::Authority>,
}

/// Every cluster by name, with the signal that stops their health checks
/// when this set is replaced.
pub struct Upstreams {
    pub by_name: crate::alb::NameMap<Arc<Upstream>>,
    _stop: watch::Sender<bool>,
}

impl Upstreams {
    /// Builds the clusters and starts their health checks (on the current
    /// runtime); they stop when this value is dropped.
    pub fn build(specs: &[ClusterSpec], start_checks: bool) -> Result<Self, String> {
        let (stop, stopped) = watch::channel(false);
        let mut by_name = crate::alb::NameMap::default();
        for spec in specs {
            let up = Arc::new(Upstream::new(spec)?);
            if start_checks && spec.health_check.is_some() {
                let checked = up.clone();
                tokio::spawn(up.cluster.clone().run_health_checks(
                    move |ep: Arc<Endpoint>, path: String, timeout: Duration| {
                        let up = checked.clone();
                        async move { up.probe(&ep, &path, timeout).await }
                    },
                    stopped.clone(),
                ));
            }
            by_name.insert(spec.name.clone(), up);
        }
        Ok(Upstreams {
            by_name,
            _stop: stop,
        })
    }
}

impl Upstream {
    pub fn new(spec: &ClusterSpec) -> Result<Self, String> {
        let cluster = Cluster::new(spec.clone()).map_err(|e| e.to_string())?;
        let tls = match &spec.tls {
            Some(tls) => {
                let mut config = (*crate::tls::upstream_client_config(tls)
                    .map_err(|e| format!("cluster {}: {e}", spec.name))?)
                .clone();
                // ALPN follows the cluster's `protocol`.
                config.alpn_protocols = vec![match spec.protocol {
                    UpstreamProtocol::Http1 => b"http/1.1".to_vec(),
                    UpstreamProtocol::Http2 => b"h2".to_vec(),
                }];
                Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
            }
            None => None,
        };
        let connector = Arc::new(Connector {
            protocol: spec.protocol,
            tls,
            connect_timeout: Duration::from_millis(spec.connect_timeout_ms),
            idle_timeout: Duration::from_millis(spec.idle_timeout_ms),
            max_idle: spec.max_idle_per_endpoint as usize,
        });
        let mut pools = Vec::new();
        let mut authorities = Vec::new();
        for e in cluster.endpoints() {
            let address = e.address();
            let authority = address
                .parse::<http::uri::Authority>()
                .map_err(|err| format!("cluster {}: endpoint {address:?}: {err}", spec.name))?;
            let server_name = match &spec.tls {
                Some(tls) => Some(
                    tls.server_name_for(authority.host())
                        .map_err(|e| format!("cluster {}: {e}", spec.name))?,
                ),
                None => None,
            };
            pools.push(Arc::new(EndpointPool::new(
                address.to_string(),
                server_name,
                connector.clone(),
            )));
            authorities.push(authority);
        }
        Ok(Upstream {
            authorities,
            pools,
            cluster,
            scheme: if spec.tls.is_some() {
                http::uri::Scheme::HTTPS
            } else {
                http::uri::Scheme::HTTP
            },
            protocol: spec.protocol,
            request_timeout: Duration::from_millis(spec.request_timeout_ms),
        })
    }

    /// The request URI for endpoint `index`: the path alone for HTTP/1.1
    /// (origin form), scheme and authority too for HTTP/2.
    pub fn uri(
        &self,
        index: usize,
        path: http::uri::PathAndQuery,
    ) -> Result<http::Uri, http::Error> {
        let mut uri = http::uri::Parts::default();
        if self.protocol == UpstreamProtocol::Http2 {
            uri.scheme = Some(self.scheme.clone());
            uri.authority = Some(self.authorities[index].clone());
        }
        uri.path_and_query = Some(path);
        Ok(http::Uri::from_parts(uri)?)
    }

    /// One active health check: GET `path`; the status, or why there is
    /// none.
    async fn probe(&self, ep: &Endpoint, path: &str, timeout: Duration) -> Result<u16, String> {
        let Some(index) = self
            .cluster
            .endpoints()
            .iter()
            .position(|e| e.address() == ep.address())
        else {
            return Err(format!("{} is no longer an endpoint", ep.address()));
        };
        let target = format!("{}://{}{path}", self.scheme, ep.address());
        let req = path
            .parse::<http::uri::PathAndQuery>()
            .map_err(http::Error::from)
            .and_then(|p| self.uri(index, p))
            .and_then(|uri| {
                http::Request::get(uri)
                    .header(http::header::HOST, self.authorities[index].as_str())
                    .header(http::header::USER_AGENT, "switchyard-alb-health-check")
                    .version(self.protocol.version())
                    .body(Empty::<Bytes>::new().map_err(|e| match e {}).boxed())
            })
            .map_err(|e| format!("health check {target}: {e}"))?;
        match tokio::time::timeout(timeout, self.pools[index].send(req.into())).await {
            Ok(Ok(resp)) => {
                let status = resp.status().as_u16();
                // Read the answer to its end, so the connection is reused.
                let _ = tokio::time::timeout(timeout, resp.into_body().collect()).await;
                Ok(status)
            }
            Ok(Err(e)) => Err(format!("{target}: {e}")),
            Err(_) => Err(format!(
                "{target}: no answer within {} ms",
                timeout.as_millis()
            )),
        }
    }
}
