//! An HTTP origin for proxy tests: HTTP/1.1 and HTTP/2 (prior knowledge) on
//! loopback, answering every request with JSON that says what it received
//! (method, path, headers, body length, version) and which origin it is.
//!
//! Paths with a meaning: `/status/<code>` answers that status;
//! `/slow/<ms>` waits first; `/bytes/<n>` answers `n` bytes of `x`;
//! `/healthz` answers 200, or what [`Origin::set_health`] says.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// A running origin; stops when dropped.
pub struct Origin {
    pub addr: SocketAddr,
    pub name: String,
    hits: Arc<AtomicUsize>,
    health: Arc<AtomicU16>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Origin {
    /// Requests answered so far (health checks included).
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// The status `/healthz` answers from now on.
    pub fn set_health(&self, status: u16) {
        self.health.store(status, Ordering::SeqCst);
    }
}

/// Starts an origin called `name` on a free loopback port.
pub async fn start(name: &str) -> Origin {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
    let addr = listener.local_addr().expect("origin addr");
    let hits = Arc::new(AtomicUsize::new(0));
    let health = Arc::new(AtomicU16::new(200));
    let (n, h, who) = (hits.clone(), health.clone(), name.to_string());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (n, h, who) = (n.clone(), h.clone(), who.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req| answer(req, n.clone(), h.clone(), who.clone()));
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Origin {
        addr,
        name: name.to_string(),
        hits,
        health,
        task,
    }
}

async fn answer(
    req: Request<Incoming>,
    hits: Arc<AtomicUsize>,
    health: Arc<AtomicU16>,
    name: String,
) -> Result<Response<Full<Bytes>>, Infallible> {
    hits.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = req.into_parts();
    let body_len = body
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    let path = parts.uri.path().to_string();
    let mut status = StatusCode::OK;
    if path == "/healthz" {
        status = StatusCode::from_u16(health.load(Ordering::SeqCst)).unwrap_or(StatusCode::OK);
    } else if let Some(code) = path.strip_prefix("/status/") {
        status = code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::BAD_REQUEST);
    } else if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
    } else if let Some(n) = path.strip_prefix("/bytes/") {
        let n: usize = n.parse().unwrap_or(0);
        return Ok(Response::new(Full::new(Bytes::from(vec![b'x'; n]))));
    }
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                serde_json::Value::String(v.to_str().unwrap_or("<binary>").to_string()),
            )
        })
        .collect();
    let doc = serde_json::json!({
        "origin": name,
        "method": parts.method.as_str(),
        "path": path,
        "query": parts.uri.query(),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_len": body_len,
    });
    let mut r = Response::new(Full::new(Bytes::from(doc.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(r)
}
