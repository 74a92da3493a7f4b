//! `demo-origin`: the origin behind the ALB in the demo stack. Every
//! request is answered with a small JSON document that says which origin
//! served it and what arrived (method, path, the forwarding headers), so a
//! user can see the whole path NLB -> ALB -> origin with one curl.
//!
//! Environment: `DEMO_ORIGIN_LISTEN` (default `0.0.0.0:8000`) and
//! `DEMO_ORIGIN_NAME` (default: the host name, a container's id).
//! `GET /healthz` answers `ok`. SIGTERM or Ctrl-C stops it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

/// Request headers echoed back: the ones the proxies in front set.
const ECHOED: &[&str] = &[
    "host",
    "user-agent",
    "x-forwarded-for",
    "x-forwarded-proto",
    "forwarded",
    "x-request-id",
];

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let listen = std::env::var("DEMO_ORIGIN_LISTEN").unwrap_or_else(|_| "0.0.0.0:8000".into());
    let name = std::env::var("DEMO_ORIGIN_NAME")
        .ok()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(host_name);
    let addr: SocketAddr = match listen.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("demo-origin: DEMO_ORIGIN_LISTEN={listen:?} is not an address: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("demo-origin: cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            eprintln!("demo-origin: cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    println!("demo-origin {name:?} listening on {addr}");
    let name: Arc<str> = name.into();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors or similar: wait, don't spin.
                    eprintln!("demo-origin: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        let _ = stream.set_nodelay(true);
        let name = name.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| answer(req, name.clone(), peer));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
    println!("demo-origin {name:?} stopping");
    ExitCode::SUCCESS
}

async fn answer(
    req: Request<Incoming>,
    name: Arc<str>,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == "/healthz" {
        return Ok(Response::new(Full::new(Bytes::from_static(b"ok\n"))));
    }
    let headers: serde_json::Map<_, _> = ECHOED
        .iter()
        .filter_map(|h| {
            let v = req.headers().get(*h)?.to_str().ok()?;
            Some((h.to_string(), json!(v)))
        })
        .collect();
    let body = json!({
        "origin": &*name,
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "query": req.uri().query().unwrap_or(""),
        "peer": peer.to_string(),
        "headers": headers,
    });
    let mut text = body.to_string();
    text.push('\n');
    let mut response = Response::new(Full::new(Bytes::from(text)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "demo-origin".into())
}
