//! The little HTTP/1.1 client the scalers need: one request per
//! connection (scaling is rare), over a unix socket (the Docker Engine API),
//! plain TCP or TLS verified against a given CA (the Kubernetes API).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};

/// Where the API is.
#[derive(Clone)]
pub enum Endpoint {
    /// A unix socket (`/var/run/docker.sock`).
    Unix(PathBuf),
    /// `http://host:port`.
    Plain { host: String, port: u16 },
    /// `https://host:port`, the server's certificate checked against `tls`.
    Tls {
        host: String,
        port: u16,
        tls: Arc<rustls::ClientConfig>,
    },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Plain { host, port } => {
                write!(f, "http://{}", crate::config::join_host_port(host, *port))
            }
            Endpoint::Tls { host, port, .. } => {
                write!(f, "https://{}", crate::config::join_host_port(host, *port))
            }
        }
    }
}

impl Endpoint {
    /// `http://host:port` or `https://host:port`; `ca_file` is read for
    /// https only.
    pub fn from_url(url: &str, ca_file: &Path) -> Result<Endpoint, String> {
        let (tls, host, port) = parse_url(url)?;
        if !tls {
            return Ok(Endpoint::Plain { host, port });
        }
        Ok(Endpoint::Tls {
            host,
            port,
            tls: Arc::new(client_tls(ca_file)?),
        })
    }
}

/// Splits `http(s)://host[:port]` (no path) into (tls, host, port).
pub fn parse_url(url: &str) -> Result<(bool, String, u16), String> {
    let bad = || format!("{url:?} is not http://host:port or https://host:port");
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(bad());
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let has_port = rest.rsplit_once(':').is_some_and(|(h, p)| {
        !p.is_empty()
            && p.bytes().all(|b| b.is_ascii_digit())
            && (!h.contains(':') || h.ends_with(']'))
    });
    let with_port = if has_port {
        rest.to_string()
    } else {
        format!("{rest}:{}", if tls { 443 } else { 80 })
    };
    let (host, port) = crate::config::split_host_port(&with_port)
        .filter(|(h, _)| {
            !h.contains('/')
                && !h.contains('@')
                && (!h.contains(':') || h.parse::<std::net::Ipv6Addr>().is_ok())
        })
        .ok_or_else(bad)?;
    Ok((tls, host.to_string(), port))
}

/// A TLS client config trusting only the CAs in `ca_file`.
pub fn client_tls(ca_file: &Path) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| format!("cannot read the CA file {}: {e}", ca_file.display()))?;
    for cert in certs {
        let cert =
            cert.map_err(|e| format!("the CA file {} is not PEM: {e}", ca_file.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("the CA file {}: {e}", ca_file.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "the CA file {} holds no certificate",
            ca_file.display()
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// An API's answer.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).trim().to_string()
    }
}

/// One request: `path` with its query, headers beyond `host`, and an
/// optional body with its content type.
pub struct Call<'a> {
    pub method: Method,
    pub path: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Option<(&'a str, Vec<u8>)>,
}

impl Call<'_> {
    pub fn new(method: Method, path: impl Into<String>) -> Self {
        Call {
            method,
            path: path.into(),
            headers: Vec::new(),
            body: None,
        }
    }
}

/// Sends one request on a new connection and reads the whole answer,
/// within `timeout`. The error says what failed, naming the endpoint.
pub async fn send(endpoint: &Endpoint, call: Call<'_>, timeout: Duration) -> Result<Reply, String> {
    let what = format!("{} {} on {endpoint}", call.method, call.path);
    match tokio::time::timeout(timeout, send_inner(endpoint, call)).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {timeout:?}")),
    }
}

async fn send_inner(endpoint: &Endpoint, call: Call<'_>) -> Result<Reply, String> {
    match endpoint {
        Endpoint::Unix(path) => {
            let s = tokio::net::UnixStream::connect(path)
                .await
                .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
            exchange(s, "localhost", call).await
        }
        Endpoint::Plain { host, port } => {
            let s = tokio::net::TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(|e| format!("cannot connect: {e}"))?;
            exchange(s, &crate::config::join_host_port(host, *port), call).await
        }
        Endpoint::Tls { host, port, tls } => {
            let s = tokio::net::TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(|e| format!("cannot connect: {e}"))?;
            let name = ServerName::try_from(host.clone())
                .map_err(|e| format!("{host:?} is not a server name: {e}"))?;
            let s = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, s)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            exchange(s, &crate::config::join_host_port(host, *port), call).await
        }
    }
}

async fn exchange<S>(stream: S, host: &str, call: Call<'_>) -> Result<Reply, String>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = http::Request::builder()
        .method(call.method)
        .uri(&call.path)
        .header(http::header::HOST, host);
    for (k, v) in call.headers {
        req = req.header(k, v);
    }
    let body = match call.body {
        Some((content_type, bytes)) => {
            req = req.header(http::header::CONTENT_TYPE, content_type);
            Full::new(Bytes::from(bytes))
        }
        None => Full::new(Bytes::new()),
    };
    let req = req.body(body).map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string());
    let out = match resp {
        Ok(resp) => {
            let status = resp.status();
            resp.into_body()
                .collect()
                .await
                .map(|b| Reply {
                    status,
                    body: b.to_bytes(),
                })
                .map_err(|e| format!("reading the answer: {e}"))
        }
        Err(e) => Err(e),
    };
    driver.abort();
    out
}

/// Percent-encodes a query value (RFC 3986 unreserved characters stay).
pub fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_host_and_port() {
        let none = Path::new("/nonexistent");
        let e = Endpoint::from_url("http://127.0.0.1:6443", none).unwrap();
        assert_eq!(e.to_string(), "http://127.0.0.1:6443");
        let e = Endpoint::from_url("http://[::1]:8/", none).unwrap();
        assert_eq!(e.to_string(), "http://[::1]:8");
        let e = Endpoint::from_url("http://kubernetes", none).unwrap();
        assert_eq!(e.to_string(), "http://kubernetes:80");
        for bad in [
            "127.0.0.1:6443",
            "ftp://x:1",
            "http://x:1/api",
            "http://",
            "http://x:y",
        ] {
            assert!(Endpoint::from_url(bad, none).is_err(), "{bad}");
        }
        let e = Endpoint::from_url("https://10.0.0.1:443", Path::new("/no/ca.crt"))
            .err()
            .unwrap();
        assert!(e.contains("/no/ca.crt"), "{e}");
    }

    #[test]
    fn query_values_are_escaped() {
        assert_eq!(
            query_escape(r#"{"label":["a=b"]}"#),
            "%7B%22label%22%3A%5B%22a%3Db%22%5D%7D"
        );
    }
}
