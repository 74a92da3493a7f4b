//! Connections to one upstream endpoint: opened with a deadline that covers
//! TCP and TLS, kept alive and reused.
//!
//! The pool is split per data thread ([`switchyard_sdk::data::worker`]): a
//! request takes an idle connection opened on its own thread, so a client
//! connection and the upstream connection serving it never wake each
//! other's threads. HTTP/1.1 connections serve one request at a time, with
//! the ALB's own client ([`crate::h1`]), and go back to their shard's idle
//! list once the answer has been read to its end; an HTTP/2 connection is
//! shared by every request of its shard.
//!
//! An idle HTTP/1.1 connection is closed after `idle_timeout` (each shard
//! sweeps its own every half of it); one the origin closed is noticed and
//! skipped when next taken, and a request without a body that a reused
//! connection ended before any answer came goes once more, on a new
//! connection, when its method is safe to repeat.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use rustls::pki_types::ServerName;
use shared_types::time::mono_ms as now_ms;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::cluster::UpstreamProtocol;
use crate::h1::{self, Io};
use crate::upstream::{BoxError, Outgoing, ProxyBody};

/// How connections to a cluster's endpoints are opened and kept.
pub struct Connector {
    pub protocol: UpstreamProtocol,
    pub tls: Option<tokio_rustls::TlsConnector>,
    /// Covers resolving, TCP and the TLS handshake.
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// Idle HTTP/1.1 connections kept per endpoint and data thread; 0
    /// closes each connection after its request.
    pub max_idle: usize,
}

/// Why a request got no answer from an endpoint.
#[derive(Debug)]
pub enum UpstreamError {
    /// No connection could be opened: nothing was sent.
    Connect(String),
    /// The exchange failed after the connection was open (HTTP/2, an
    /// upgrade).
    Http(hyper::Error),
    /// The exchange failed after the connection was open (HTTP/1.1).
    H1(h1::Error),
}

impl UpstreamError {
    /// Whether nothing reached the endpoint (so the request may go again).
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(_))
    }
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Connect(why) => f.write_str(why),
            UpstreamError::Http(e) => write!(f, "{e}"),
            UpstreamError::H1(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for UpstreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UpstreamError::Connect(_) => None,
            UpstreamError::Http(e) => Some(e),
            UpstreamError::H1(e) => Some(e),
        }
    }
}

/// One endpoint's connections, split per data thread.
pub struct EndpointPool {
    address: String,
    /// The TLS name to send and verify (with TLS only).
    server_name: Option<ServerName<'static>>,
    connector: Arc<Connector>,
    shards: Box<[Mutex<Shard>]>,
    /// Per shard: held while an HTTP/2 connection is being opened, so the
    /// requests that find none wait for that one instead of each opening
    /// their own.
    h2_opening: Box<[tokio::sync::Mutex<()>]>,
}

#[derive(Default)]
struct Shard {
    idle: Vec<Idle>,
    /// The sweep of `idle`, once started.
    sweeper: Option<tokio::task::JoinHandle<()>>,
    h2: Option<(http2::SendRequest<ProxyBody>, Arc<Usage>)>,
}

/// An idle HTTP/1.1 connection, and since when it has been idle.
struct Idle {
    conn: h1::Conn,
    since_ms: u64,
}

impl Idle {
    /// Idle for `idle_ms` or longer at `now` (ms).
    fn expired(&self, now: u64, idle_ms: u64) -> bool {
        now.saturating_sub(self.since_ms) >= idle_ms
    }
}

/// What an HTTP/2 connection's task needs to know to close it when idle:
/// the requests in flight on it, and since when it has had none.
#[derive(Default)]
struct Usage {
    busy: AtomicUsize,
    idle_since_ms: AtomicU64,
}

impl Usage {
    fn start(&self) {
        self.busy.fetch_add(1, Ordering::Relaxed);
    }

    fn end(&self) {
        if self.busy.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.idle_since_ms.store(now_ms(), Ordering::Relaxed);
        }
    }

    /// When the connection may close, if it stays idle.
    fn closes_at(&self, idle_timeout: Duration) -> Option<u64> {
        if self.busy.load(Ordering::Relaxed) > 0 {
            return None;
        }
        Some(self.idle_since_ms.load(Ordering::Relaxed) + idle_timeout.as_millis() as u64)
    }
}

impl EndpointPool {
    /// The pool for `address` (`host:port`), with one shard per core (data
    /// threads beyond that share) and one for the rest (health checks).
    pub fn new(
        address: String,
        server_name: Option<ServerName<'static>>,
        connector: Arc<Connector>,
    ) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        EndpointPool {
            address,
            server_name,
            connector,
            shards: (0..=cores).map(|_| Mutex::default()).collect(),
            h2_opening: (0..=cores).map(|_| tokio::sync::Mutex::new(())).collect(),
        }
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    fn shard(&self) -> usize {
        let last = self.shards.len() - 1;
        switchyard_sdk::data::worker().map_or(last, |w| w % last.max(1))
    }

    /// Sends `req` (its URI in the form the protocol wants) and returns the
    /// answer once its head has arrived. The connection is reused after the
    /// answer's body has been read to its end.
    pub async fn send(self: &Arc<Self>, req: Outgoing) -> Result<Response<Leased>, UpstreamError> {
        match self.connector.protocol {
            UpstreamProtocol::Http1 => self.send_h1(req).await,
            UpstreamProtocol::Http2 => self.send_h2(req.req).await,
        }
    }

    async fn send_h1(
        self: &Arc<Self>,
        mut req: Outgoing,
    ) -> Result<Response<Leased>, UpstreamError> {
        let shard = self.shard();
        while let Some(mut conn) = self.take_idle(shard) {
            if !conn.is_usable() {
                continue;
            }
            match conn.send(req).await {
                Ok(resp) => return Ok(self.lease_h1(resp, shard)),
                // The origin had closed it as the request went: the request
                // goes once more, on a new connection (not on another idle
                // one, which may be as stale, so that a request is sent
                // twice at most).
                Err(h1::Failed {
                    unsent: Some(r), ..
                }) => {
                    req = r;
                    break;
                }
                Err(failed) => return Err(UpstreamError::H1(failed.error)),
            }
        }
        // Opening is the rare path: boxed, so its (large) future does not
        // make every request's future larger.
        let conn = h1::Conn::new(Box::pin(self.connect()).await?);
        match conn.send(req).await {
            Ok(resp) => Ok(self.lease_h1(resp, shard)),
            Err(failed) => Err(UpstreamError::H1(failed.error)),
        }
    }

    /// The shard's most recently used idle connection, unless it has been
    /// idle too long (then it and all older ones are closed).
    fn take_idle(&self, shard: usize) -> Option<h1::Conn> {
        let mut s = self.shards[shard].lock();
        let idle = s.idle.pop()?;
        if idle.expired(now_ms(), self.idle_ms()) {
            // Closed once the lock is let go.
            let expired = std::mem::take(&mut s.idle);
            drop(s);
            drop((idle, expired));
            return None;
        }
        Some(idle.conn)
    }

    fn idle_ms(&self) -> u64 {
        self.connector.idle_timeout.as_millis() as u64
    }

    /// Sends a request that asks to upgrade (WebSocket) on a connection of
    /// its own, never pooled: after `101` it is the tunnel's.
    pub async fn send_upgrade(
        &self,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let io = self.connect().await?;
        let (mut sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(UpstreamError::Http)?;
        let usage = Arc::new(Usage::default());
        tokio::spawn(watch_idle(
            conn.with_upgrades(),
            usage,
            self.connector.idle_timeout,
        ));
        sender.send_request(req).await.map_err(UpstreamError::Http)
    }

    fn lease_h1(self: &Arc<Self>, resp: Response<h1::Answer>, shard: usize) -> Response<Leased> {
        let lease = Lease {
            usage: None,
            back: Some((self.clone(), shard)),
        };
        resp.map(|body| Leased::new(Inner::H1(body), lease))
    }

    async fn send_h2(
        self: &Arc<Self>,
        req: Request<ProxyBody>,
    ) -> Result<Response<Leased>, UpstreamError> {
        let shard = self.shard();
        let (mut sender, usage) = match self.shared_h2(shard) {
            Some(x) => x,
            None => {
                let _opening = self.h2_opening[shard].lock().await;
                // Another request may have opened it while this one waited.
                match self.shared_h2(shard) {
                    Some(x) => x,
                    None => {
                        let (sender, usage) = Box::pin(self.open_h2()).await?;
                        self.shards[shard].lock().h2 = Some((sender.clone(), usage.clone()));
                        (sender, usage)
                    }
                }
            }
        };
        usage.start();
        let lease = Lease {
            usage: Some(usage),
            back: None,
        };
        match sender.send_request(req).await {
            Ok(resp) => Ok(resp.map(|body| Leased::new(Inner::H2(body), lease))),
            Err(e) => Err(UpstreamError::Http(e)),
        }
    }

    /// The shard's HTTP/2 connection, if it has a live one.
    fn shared_h2(&self, shard: usize) -> Option<(http2::SendRequest<ProxyBody>, Arc<Usage>)> {
        let mut s = self.shards[shard].lock();
        match &s.h2 {
            Some((sender, _)) if sender.is_closed() => {
                s.h2 = None;
                None
            }
            Some((sender, usage)) => Some((sender.clone(), usage.clone())),
            None => None,
        }
    }

    /// Puts an HTTP/1.1 connection whose answer has been read back on its
    /// shard's idle list (when there is room).
    fn put_back(self: &Arc<Self>, shard: usize, conn: h1::Conn) {
        let mut s = self.shards[shard].lock();
        if s.idle.len() >= self.connector.max_idle {
            return;
        }
        s.idle.push(Idle {
            conn,
            since_ms: now_ms(),
        });
        // The shard's sweep runs on the thread that uses the shard (again,
        // should the runtime it ran on have stopped).
        if s.sweeper.as_ref().is_none_or(|t| t.is_finished()) {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                s.sweeper = Some(runtime.spawn(sweep(Arc::downgrade(self), shard)));
            }
        }
    }

    /// A connection to the endpoint: TCP, then TLS when configured, within
    /// the connect timeout.
    async fn connect(&self) -> Result<Box<dyn Io>, UpstreamError> {
        let timeout = self.connector.connect_timeout;
        let open = async {
            let tcp = TcpStream::connect(&self.address).await?;
            let _ = tcp.set_nodelay(true);
            let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(
                &socket2::TcpKeepalive::new().with_time(Duration::from_secs(60)),
            );
            match (&self.connector.tls, &self.server_name) {
                (Some(tls), Some(name)) => {
                    let stream = tls.connect(name.clone(), tcp).await?;
                    Ok::<Box<dyn Io>, io::Error>(Box::new(stream))
                }
                _ => Ok(Box::new(tcp) as Box<dyn Io>),
            }
        };
        match tokio::time::timeout(timeout, open).await {
            Ok(Ok(io)) => Ok(io),
            Ok(Err(e)) => Err(UpstreamError::Connect(innermost(&e))),
            Err(_) => Err(UpstreamError::Connect(format!(
                "no connection within {} ms",
                timeout.as_millis()
            ))),
        }
    }

    async fn open_h2(&self) -> Result<(http2::SendRequest<ProxyBody>, Arc<Usage>), UpstreamError> {
        let io = self.connect().await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(io))
            .await
            .map_err(UpstreamError::Http)?;
        let usage = Arc::new(Usage::default());
        tokio::spawn(watch_idle(conn, usage.clone(), self.connector.idle_timeout));
        Ok((sender, usage))
    }
}

/// Drives a connection until it ends, or until it has been idle for
/// `idle_timeout` (then it is closed: dropping it closes the socket, and
/// its sender reports closed).
async fn watch_idle<C>(conn: C, usage: Arc<Usage>, idle_timeout: Duration)
where
    C: std::future::Future<Output = hyper::Result<()>>,
{
    usage.idle_since_ms.store(now_ms(), Ordering::Relaxed);
    tokio::pin!(conn);
    let sleep = tokio::time::sleep(idle_timeout);
    tokio::pin!(sleep);
    // The timer is polled only to arm it (at first and after a reset) and
    // once it has fired: an armed timer wakes this task by itself, and
    // polling it on every wake of the connection (several per request)
    // cost a hundred-odd instructions each time.
    let mut armed = false;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            if let Err(e) = r {
                tracing::debug!(error = %e, "upstream connection ended");
            }
            return Poll::Ready(());
        }
        loop {
            if armed && !sleep.is_elapsed() {
                return Poll::Pending;
            }
            if std::future::Future::poll(sleep.as_mut(), cx).is_pending() {
                armed = true;
                return Poll::Pending;
            }
            let now = now_ms();
            match usage.closes_at(idle_timeout) {
                Some(at) if at <= now => return Poll::Ready(()),
                Some(at) => sleep
                    .as_mut()
                    .reset(Instant::now() + Duration::from_millis(at - now)),
                None => sleep.as_mut().reset(Instant::now() + idle_timeout),
            }
            armed = false;
        }
    })
    .await
}

/// Closes a shard's HTTP/1.1 connections idle for the idle timeout,
/// checking every half of it, for as long as the pool is in use.
async fn sweep(pool: Weak<EndpointPool>, shard: usize) {
    let every = match pool.upgrade() {
        Some(p) => (p.connector.idle_timeout / 2).max(Duration::from_millis(10)),
        None => return,
    };
    loop {
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let idle_ms = pool.idle_ms();
        let now = now_ms();
        // Oldest first: the list is used from its end. Closed once the lock
        // is let go.
        let expired: Vec<Idle> = {
            let mut s = pool.shards[shard].lock();
            let n = s
                .idle
                .iter()
                .take_while(|i| i.expired(now, idle_ms))
                .count();
            s.idle.drain(..n).collect()
        };
        drop(expired);
    }
}

/// The innermost error's text (`connection refused`, a certificate
/// problem), which says more than the outer ones.
fn innermost(e: &io::Error) -> String {
    // An io::Error's own `source` skips the error it wraps.
    let Some(inner) = e.get_ref() else {
        return e.to_string();
    };
    let mut cur: &(dyn std::error::Error + 'static) = inner;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// An answer's claim on its connection: the request counts as in flight
/// (HTTP/2) until the body is done, and an HTTP/1.1 connection goes back
/// to the pool once its body has been read to the end (not when dropped
/// early: then the connection is unusable and closes).
struct Lease {
    usage: Option<Arc<Usage>>,
    back: Option<(Arc<EndpointPool>, usize)>,
}

enum Inner {
    H1(h1::Answer),
    H2(Incoming),
}

/// An upstream answer's body, holding its connection's lease.
pub struct Leased {
    body: Inner,
    lease: Option<Lease>,
}

impl Leased {
    fn new(body: Inner, lease: Lease) -> Self {
        let mut leased = Leased {
            body,
            lease: Some(lease),
        };
        if leased.is_end_stream() {
            leased.release(true);
        }
        leased
    }

    fn release(&mut self, read_to_end: bool) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        if let Some(usage) = &lease.usage {
            usage.end();
        }
        if let (Some((pool, shard)), Inner::H1(answer), true) =
            (lease.back, &mut self.body, read_to_end)
        {
            if let Some(conn) = answer.finish() {
                pool.put_back(shard, conn);
            }
        }
    }
}

impl Drop for Leased {
    fn drop(&mut self) {
        self.release(false);
    }
}

impl Body for Leased {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r: Poll<Option<Result<Frame<Bytes>, BoxError>>> = match &mut self.body {
            Inner::H1(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
            Inner::H2(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
        };
        match &r {
            // The end: hyper may never ask again once a sized body is in.
            Poll::Ready(Some(Ok(_))) if self.is_end_stream() => self.release(true),
            Poll::Ready(None) => self.release(true),
            Poll::Ready(Some(Err(_))) => self.release(false),
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        match &self.body {
            Inner::H1(b) => b.is_end_stream(),
            Inner::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Inner::H1(b) => b.size_hint(),
            Inner::H2(b) => b.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use http_body_util::{BodyExt, Empty, Full};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// An origin that answers every request with "ok" and counts the
    /// connections it accepted and those that have closed.
    struct Origin {
        addr: std::net::SocketAddr,
        accepted: Arc<AtomicUsize>,
        closed: Arc<AtomicUsize>,
    }

    async fn origin(http2: bool) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (a, c) = (accepted.clone(), closed.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                a.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    });
                    let io = TokioIo::new(tcp);
                    let _ = if http2 {
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await
                    } else {
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await
                    };
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Origin {
            addr,
            accepted,
            closed,
        }
    }

    fn pool(
        addr: impl ToString,
        protocol: UpstreamProtocol,
        max_idle: usize,
        idle_ms: u64,
    ) -> Arc<EndpointPool> {
        Arc::new(EndpointPool::new(
            addr.to_string(),
            None,
            Arc::new(Connector {
                protocol,
                tls: None,
                connect_timeout: Duration::from_millis(500),
                idle_timeout: Duration::from_millis(idle_ms),
                max_idle,
            }),
        ))
    }

    fn get(protocol: UpstreamProtocol, addr: std::net::SocketAddr) -> Request<ProxyBody> {
        let uri = match protocol {
            UpstreamProtocol::Http1 => "/".to_string(),
            UpstreamProtocol::Http2 => format!("http://{addr}/"),
        };
        Request::get(uri)
            .header(http::header::HOST, addr.to_string())
            .version(protocol.version())
            .body(Empty::<Bytes>::new().map_err(|e| match e {}).boxed())
            .unwrap()
    }

    async fn fetch(pool: &Arc<EndpointPool>, addr: std::net::SocketAddr) -> Bytes {
        let resp = pool
            .send(get(pool.connector.protocol, addr).into())
            .await
            .unwrap();
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    async fn eventually(what: &str, f: impl Fn() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what} did not happen within 5 s");
    }

    #[tokio::test]
    async fn http1_connections_are_reused_once_the_answer_is_read() {
        let o = origin(false).await;
        let p = pool(o.addr, UpstreamProtocol::Http1, 8, 60_000);
        for _ in 0..5 {
            assert_eq!(fetch(&p, o.addr).await, "ok");
        }
        assert_eq!(o.accepted.load(Ordering::SeqCst), 1);
        // Five at once need five connections; all are kept afterwards.
        let all: Vec<_> = (0..5).map(|_| fetch(&p, o.addr)).collect();
        for body in futures::future::join_all(all).await {
            assert_eq!(body, "ok");
        }
        assert_eq!(o.accepted.load(Ordering::SeqCst), 5);
        let last = p.shards.len() - 1;
        assert_eq!(p.shards[last].lock().idle.len(), 5);
    }

    #[tokio::test]
    async fn an_answer_dropped_half_read_does_not_return_its_connection() {
        let o = origin(false).await;
        let p = pool(o.addr, UpstreamProtocol::Http1, 8, 60_000);
        let resp = p
            .send(get(UpstreamProtocol::Http1, o.addr).into())
            .await
            .unwrap();
        drop(resp);
        let last = p.shards.len() - 1;
        assert_eq!(p.shards[last].lock().idle.len(), 0);
        assert_eq!(fetch(&p, o.addr).await, "ok");
        assert_eq!(o.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn max_idle_zero_closes_each_connection_after_its_request() {
        let o = origin(false).await;
        let p = pool(o.addr, UpstreamProtocol::Http1, 0, 60_000);
        for _ in 0..3 {
            assert_eq!(fetch(&p, o.addr).await, "ok");
        }
        assert_eq!(o.accepted.load(Ordering::SeqCst), 3);
        eventually("three closed connections", || {
            o.closed.load(Ordering::SeqCst) == 3
        })
        .await;
    }

    #[tokio::test]
    async fn idle_connections_close_after_the_idle_timeout() {
        let o = origin(false).await;
        let p = pool(o.addr, UpstreamProtocol::Http1, 8, 200);
        assert_eq!(fetch(&p, o.addr).await, "ok");
        eventually("the idle connection closed", || {
            o.closed.load(Ordering::SeqCst) == 1
        })
        .await;
        // The closed one is skipped: the next request opens another.
        assert_eq!(fetch(&p, o.addr).await, "ok");
        assert_eq!(o.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_origin_closed_while_idle_is_skipped() {
        // An origin that answers one request per connection, keep-alive in
        // its words, and then closes without saying so.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                a.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut have = 0;
                    while !buf[..have].windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = tcp.read(&mut buf[have..]).await.unwrap();
                        if n == 0 {
                            return;
                        }
                        have += n;
                    }
                    tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                });
            }
        });
        let p = pool(addr, UpstreamProtocol::Http1, 8, 60_000);
        assert_eq!(fetch(&p, addr).await, "ok");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(fetch(&p, addr).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_get_a_stale_connection_dropped_goes_once_more_on_a_new_one() {
        // Answers the first request on each connection; a second one is
        // counted and the connection closed without an answer.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicUsize::new(0));
        let (a, d) = (accepted.clone(), dropped.clone());
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                a.fetch_add(1, Ordering::SeqCst);
                let d = d.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    for answered in [true, false] {
                        let mut have = 0;
                        while !buf[..have].windows(4).any(|w| w == b"\r\n\r\n") {
                            match tcp.read(&mut buf[have..]).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => have += n,
                            }
                        }
                        if answered {
                            tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                                .await
                                .unwrap();
                        } else {
                            d.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        let p = pool(addr, UpstreamProtocol::Http1, 8, 60_000);
        // Three idle connections, each of which will drop its next request.
        let three: Vec<_> = (0..3).map(|_| fetch(&p, addr)).collect();
        for body in futures::future::join_all(three).await {
            assert_eq!(body, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        assert_eq!(fetch(&p, addr).await, "ok");
        // Sent on one stale connection, then on a new one: twice, not once
        // per idle connection.
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
        // A POST is not sent again.
        let post = Request::post("/")
            .header(http::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new().map_err(|e| match e {}).boxed())
            .unwrap();
        assert!(p.send(post.into()).await.is_err());
        assert_eq!(dropped.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn http2_requests_share_one_connection() {
        let o = origin(true).await;
        let p = pool(o.addr, UpstreamProtocol::Http2, 8, 60_000);
        // Ten at once before any connection exists: one is opened.
        let first: Vec<_> = (0..10).map(|_| fetch(&p, o.addr)).collect();
        for body in futures::future::join_all(first).await {
            assert_eq!(body, "ok");
        }
        assert_eq!(o.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(fetch(&p, o.addr).await, "ok");
        let all: Vec<_> = (0..10).map(|_| fetch(&p, o.addr)).collect();
        for body in futures::future::join_all(all).await {
            assert_eq!(body, "ok");
        }
        assert_eq!(o.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_connect_timeout_covers_the_tls_handshake() {
        // Accepts TCP, never answers the ClientHello.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                held.push(tcp);
            }
        });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let p = Arc::new(EndpointPool::new(
            addr.to_string(),
            Some(ServerName::try_from("origin.test").unwrap()),
            Arc::new(Connector {
                protocol: UpstreamProtocol::Http1,
                tls: Some(tokio_rustls::TlsConnector::from(Arc::new(config))),
                connect_timeout: Duration::from_millis(200),
                idle_timeout: Duration::from_secs(60),
                max_idle: 8,
            }),
        ));
        let Err(err) = p.send(get(UpstreamProtocol::Http1, addr).into()).await else {
            panic!("the request got an answer");
        };
        assert!(err.is_connect(), "{err}");
        assert_eq!(err.to_string(), "no connection within 200 ms");
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error_naming_the_cause() {
        let unused = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = unused.local_addr().unwrap();
        drop(unused);
        let p = pool(addr, UpstreamProtocol::Http1, 8, 60_000);
        let Err(err) = p.send(get(UpstreamProtocol::Http1, addr).into()).await else {
            panic!("the request got an answer");
        };
        assert!(err.is_connect());
        assert!(err.to_string().contains("refused"), "{err}");
    }
}
