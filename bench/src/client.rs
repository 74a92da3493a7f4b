//! Control API clients, and the bearer token a call carries when auth is on.
//!
//! The generated tonic client runs over a bare hyper HTTP/2 connection
//! rather than tonic's `Channel`: `Channel` puts a buffer task (and a
//! timer per call, with a timeout) in front of each connection, which costs
//! the load client CPU that, on a small machine, the NLB under test then
//! lacks. Calls are bounded by the load loops' deadlines instead.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use shared_types::pb::nlb_service_client::NlbServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::Request;

/// One HTTP/2 connection, shareable: clones multiplex calls over it.
#[derive(Clone)]
pub struct Connection(SendRequest<tonic::body::Body>);

type ResponseFuture = Pin<
    Box<dyn Future<Output = Result<http::Response<hyper::body::Incoming>, hyper::Error>> + Send>,
>;

impl tower::Service<http::Request<tonic::body::Body>> for Connection {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}

pub type Client = NlbServiceClient<Connection>;

/// Deadline for opening a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens `n` clients to `addr` (`host:port`), each on its own connection.
pub async fn connect(addr: &str, n: usize) -> Result<Vec<Client>> {
    let origin: http::Uri = format!("http://{addr}").parse().context("gRPC address")?;
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .with_context(|| format!("connect to {addr}: timed out"))?
            .with_context(|| format!("connect to {addr}"))?;
        tcp.set_nodelay(true)?;
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(tcp))
            .await
            .with_context(|| format!("HTTP/2 handshake with {addr}"))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                eprintln!("connection to the NLB closed: {e}");
            }
        });
        clients.push(
            NlbServiceClient::with_origin(Connection(send), origin.clone())
                .max_decoding_message_size(64 << 20),
        );
    }
    Ok(clients)
}

/// The credentials a call carries: `authorization: Bearer <token>`, or none.
#[derive(Clone, Default)]
pub struct Auth {
    header: Option<MetadataValue<Ascii>>,
}

impl Auth {
    pub fn bearer(token: Option<&str>) -> Result<Self> {
        let header = token
            .filter(|t| !t.is_empty())
            .map(|t| format!("Bearer {t}").parse())
            .transpose()
            .context("the token is not a valid header value")?;
        Ok(Auth { header })
    }

    pub fn is_set(&self) -> bool {
        self.header.is_some()
    }

    /// `msg` as a request with the credentials attached.
    pub fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        req
    }
}
