//! Upstream clusters at run time: each cluster with its pooled HTTP client
//! (keep-alive, HTTP/1.1 or HTTP/2, optional TLS with a client
//! certificate) and its active health checks.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::watch;

use crate::cluster::{Cluster, ClusterSpec, Endpoint, UpstreamProtocol};

/// Request and response bodies through the proxy.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;
pub type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, ProxyBody>;

/// A cluster and how to reach it.
pub struct Upstream {
    pub cluster: Arc<Cluster>,
    pub client: HttpClient,
    /// `http` or `https`.
    pub scheme: &'static str,
    pub protocol: UpstreamProtocol,
    pub request_timeout: Duration,
    /// Each endpoint's address as a URI authority, by endpoint index.
    pub authorities: Vec<http::uri::Authority>,
}

/// Every cluster by name, with the signal that stops their health checks
/// when this set is replaced.
pub struct Upstreams {
    pub by_name: HashMap<String, Arc<Upstream>>,
    _stop: watch::Sender<bool>,
}

impl Upstreams {
    /// Builds the clusters and starts their health checks (on the current
    /// runtime); they stop when this value is dropped.
    pub fn build(specs: &[ClusterSpec], start_checks: bool) -> Result<Self, String> {
        let (stop, stopped) = watch::channel(false);
        let mut by_name = HashMap::new();
        for spec in specs {
            let up = Arc::new(Upstream::new(spec)?);
            if start_checks && spec.health_check.is_some() {
                let probe_client = up.client.clone();
                let scheme = up.scheme;
                let timeout_host = spec.name.clone();
                tokio::spawn(up.cluster.clone().run_health_checks(
                    move |ep: Arc<Endpoint>, path: String, timeout: Duration| {
                        let client = probe_client.clone();
                        let cluster = timeout_host.clone();
                        async move {
                            probe(&client, scheme, ep.address(), &path, timeout, &cluster).await
                        }
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
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_millis(spec.connect_timeout_ms)));
        http.enforce_http(false);
        http.set_keepalive(Some(Duration::from_secs(60)));
        let (connector, scheme) = match &spec.tls {
            Some(tls) => {
                let mut config = (*crate::tls::upstream_client_config(tls)
                    .map_err(|e| format!("cluster {}: {e}", spec.name))?)
                .clone();
                // ALPN follows the cluster's `protocol` (hyper-rustls sets it
                // and refuses a config that already has it).
                config.alpn_protocols.clear();
                let builder = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(config)
                    .https_only();
                let builder = match &tls.server_name {
                    Some(name) => {
                        let name = tls
                            .server_name_for(name)
                            .map_err(|e| format!("cluster {}: {e}", spec.name))?;
                        builder.with_server_name_resolver(
                            hyper_rustls::FixedServerNameResolver::new(name),
                        )
                    }
                    None => builder,
                };
                let c = match spec.protocol {
                    UpstreamProtocol::Http1 => builder.enable_http1().wrap_connector(http),
                    UpstreamProtocol::Http2 => builder.enable_http2().wrap_connector(http),
                };
                (c, "https")
            }
            None => (
                hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(
                        rustls::ClientConfig::builder_with_provider(Arc::new(
                            rustls::crypto::ring::default_provider(),
                        ))
                        .with_safe_default_protocol_versions()
                        .map_err(|e| e.to_string())?
                        .with_root_certificates(rustls::RootCertStore::empty())
                        .with_no_client_auth(),
                    )
                    .https_or_http()
                    .enable_all_versions()
                    .wrap_connector(http),
                "http",
            ),
        };
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_millis(spec.idle_timeout_ms))
            .pool_max_idle_per_host(spec.max_idle_per_endpoint as usize);
        if spec.protocol == UpstreamProtocol::Http2 {
            builder.http2_only(true);
        }
        let authorities = cluster
            .endpoints()
            .iter()
            .map(|e| {
                e.address().parse::<http::uri::Authority>().map_err(|err| {
                    format!("cluster {}: endpoint {:?}: {err}", spec.name, e.address())
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Upstream {
            authorities,
            cluster,
            client: builder.build(connector),
            scheme,
            protocol: spec.protocol,
            request_timeout: Duration::from_millis(spec.request_timeout_ms),
        })
    }
}

/// One active health check: GET `path`; the status, or why there is none.
async fn probe(
    client: &HttpClient,
    scheme: &str,
    address: &str,
    path: &str,
    timeout: Duration,
    cluster: &str,
) -> Result<u16, String> {
    let uri = format!("{scheme}://{address}{path}");
    let req = http::Request::get(&uri)
        .header(http::header::USER_AGENT, "switchyard-alb-health-check")
        .body(Empty::<Bytes>::new().map_err(|e| match e {}).boxed())
        .map_err(|e| format!("cluster {cluster}: health check {uri}: {e}"))?;
    match tokio::time::timeout(timeout, client.request(req)).await {
        Ok(Ok(resp)) => Ok(resp.status().as_u16()),
        Ok(Err(e)) => Err(format!("{uri}: {e}")),
        Err(_) => Err(format!(
            "{uri}: no answer within {} ms",
            timeout.as_millis()
        )),
    }
}
