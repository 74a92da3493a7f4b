//! The data path: one connection from the NLB (TLS or plaintext, HTTP/1.1
//! or HTTP/2), each request routed, limited, forwarded to an upstream
//! endpoint with retries, and answered.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use switchyard_sdk::data::Closing;
use switchyard_sdk::{Connection, Context};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::alb::Alb;
use crate::cluster::{Outcome, UpstreamProtocol, MAX_ATTEMPTS};
use crate::conn_timer::ConnTimer;
use crate::deadline::{Arrived, FirstStream};
use crate::headers::{self, X_REQUEST_ID};
use crate::upstream::{BoxError, Outgoing, ProxyBody, Upstream};

/// Serves one connection until it ends or the SDK asks it to finish.
///
/// The connection's HTTP future (several KiB: the request's whole exchange
/// is in it) is boxed, here, once, and so is a TLS handshake's: this future
/// stays a few hundred bytes, which the SDK's boxing of it and its first
/// poll each copy. (Held inline, the HTTP future made this one as large,
/// and each of those copied all of it; the handshake's state, inline, made
/// it 3.4 KiB for plain connections too.)
pub async fn serve(alb: Arc<Alb>, conn: Connection) {
    match alb.tls_config() {
        Some(config) => Box::pin(serve_tls(alb, conn, config)).await,
        None => {
            let (client, closing, ctx) = (conn.client, conn.closing.clone(), conn.ctx.clone());
            Box::pin(serve_http(alb, conn.stream, client, false, closing, ctx)).await
        }
    }
}

/// A connection to the TLS listener: plaintext is served as such (the
/// first bytes say which), TLS after its handshake.
async fn serve_tls(alb: Arc<Alb>, conn: Connection, config: Arc<rustls::ServerConfig>) {
    let client = conn.client;
    let ctx = conn.ctx.clone();
    let closing = conn.closing.clone();
    let header_timeout = Duration::from_millis(alb.limits().header_read_timeout_ms);
    // Peek until the first bytes say TLS or not (a ClientHello may arrive a
    // byte at a time).
    let sniff = async {
        let mut first = [0u8; crate::tls::TLS_SNIFF_BYTES];
        loop {
            let n = conn.stream.get_ref().peek(&mut first).await?;
            match crate::tls::sniff_tls(&first[..n]) {
                crate::tls::TlsSniff::Tls => return Ok::<_, std::io::Error>(true),
                crate::tls::TlsSniff::NotTls => return Ok(false),
                crate::tls::TlsSniff::NeedMore if n == 0 => return Ok(false),
                crate::tls::TlsSniff::NeedMore => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
            }
        }
    };
    let tls = match tokio::time::timeout(header_timeout, sniff).await {
        Ok(Ok(tls)) => tls,
        _ => {
            alb.metrics()
                .refused
                .with_label_values(&["header_timeout"])
                .inc();
            return;
        }
    };
    if !tls {
        return serve_http(alb, conn.stream, client, false, closing, ctx).await;
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    match tokio::time::timeout(header_timeout, acceptor.accept(conn.stream)).await {
        Ok(Ok(stream)) => serve_http(alb, stream, client, true, closing, ctx).await,
        Ok(Err(e)) => {
            alb.metrics()
                .refused
                .with_label_values(&["tls_handshake"])
                .inc();
            tracing::debug!(%client, error = %e, "TLS handshake failed");
        }
        Err(_) => {
            alb.metrics()
                .refused
                .with_label_values(&["tls_handshake"])
                .inc();
            tracing::debug!(%client, "TLS handshake did not finish in time");
        }
    }
}

async fn serve_http<S>(
    alb: Arc<Alb>,
    mut stream: S,
    client: SocketAddr,
    tls: bool,
    mut closing: Closing,
    ctx: Arc<Context>,
) where
    S: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static,
{
    let limits = alb.limits().clone();
    let header_timeout = Duration::from_millis(limits.header_read_timeout_ms);
    let first_deadline = tokio::time::Instant::now() + header_timeout;
    // One timer for the connection's deadlines: the request heads', and
    // (HTTP/1 has one request in flight at a time, on this task) their
    // upstream answers'.
    let timer = ConnTimer::default();
    // HTTP/2 (prior knowledge, or after ALPN `h2`) or HTTP/1, from the first
    // bytes; they are given to the protocol that serves the rest.
    // A client that has not said which by the deadline is HTTP/1's to
    // answer (its server finds the deadline passed: 408).
    let (read, http2) = match read_version(&mut stream, first_deadline, &timer).await {
        Ok(Some(read)) => read,
        Ok(None) => return, // closed before a byte came
        Err(e) => {
            tracing::debug!(%client, error = %e, "connection ended before its first request");
            return;
        }
    };
    let tunnels: Tunnels = Arc::default();
    let peer = Peer {
        addr: client,
        tls,
        names: headers::ClientNames::new(client.ip()),
    };
    if !http2 {
        let on_conn = OnConnection {
            alb,
            ctx,
            tunnels: tunnels.clone(),
            upstream_timer: Some(timer),
            peer,
        };
        let settings = crate::h1::server::Settings {
            max_head: limits.max_header_bytes,
            max_headers: limits.max_headers,
            header_timeout,
            close_notify: tls,
        };
        let timer = on_conn
            .upstream_timer
            .as_ref()
            .unwrap_or_else(|| unreachable!());
        crate::h1::server::serve(
            stream,
            read,
            first_deadline,
            settings,
            timer,
            closing.clone(),
            &on_conn,
        )
        .await;
    } else {
        serve_http2(
            &alb,
            stream,
            read,
            first_deadline,
            (ctx, tunnels.clone(), peer),
            &mut closing,
        )
        .await;
    }
    // A WebSocket outlives the connection's requests: the connection is
    // done when its tunnels are, or when the SDK wants it closed.
    let pending: Vec<_> = std::mem::take(&mut *tunnels.lock());
    for tunnel in pending {
        let abort = tunnel.abort_handle();
        tokio::select! {
            _ = tunnel => {}
            _ = closing.wait() => abort.abort(),
        }
    }
}

/// An HTTP/2 connection (hyper's server) until it ends, or until the SDK
/// asks it to finish: then the streams in flight finish, the client is told
/// to go (GOAWAY), and it ends. `read` holds its first bytes.
async fn serve_http2<S>(
    alb: &Arc<Alb>,
    stream: S,
    read: bytes::BytesMut,
    first_deadline: tokio::time::Instant,
    (ctx, tunnels, peer): (Arc<Context>, Tunnels, Peer),
    closing: &mut Closing,
) where
    S: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static,
{
    let client = peer.addr;
    let limits = alb.limits().clone();
    // A client that opens no stream by the deadline is closed.
    let arrived = Arrived::default();
    let mut stream = FirstStream::new(stream, first_deadline, arrived.clone(), read);
    let refused = alb.metrics().refused_header_timeout.clone();
    stream.on_timeout = Some(Box::new(move || refused.inc()));
    let on_conn = Arc::new(OnConnection {
        alb: alb.clone(),
        ctx,
        tunnels,
        upstream_timer: None,
        peer,
    });
    let respond = move |req: Request<Incoming>| {
        arrived.mark();
        let c = on_conn.clone();
        // A body that has ended (most requests) goes as an empty one, which
        // boxes without allocating.
        let req = req.map(|body| {
            if body.is_end_stream() {
                Empty::new().map_err(|e| match e {}).boxed()
            } else {
                body.map_err(BoxError::from).boxed()
            }
        });
        async move {
            let mut resp = c
                .alb
                .handle(req, &c.peer, &c.ctx, &c.tunnels, c.upstream_timer.as_ref())
                .await;
            // An HTTP/1.1 origin's head, kept as it came, into the map
            // hyper encodes.
            if let Some(raw) = resp.extensions_mut().remove::<crate::h1::RawHead>() {
                let mut headers = HeaderMap::new();
                raw.append_to(&mut headers);
                // The ALB's own headers (`x-request-id`) replace the
                // origin's of the same name.
                let mut last = None;
                for (name, value) in std::mem::take(resp.headers_mut()) {
                    match name {
                        Some(name) => {
                            headers.insert(name.clone(), value);
                            last = Some(name);
                        }
                        None => {
                            if let Some(name) = &last {
                                headers.append(name.clone(), value);
                            }
                        }
                    }
                }
                *resp.headers_mut() = headers;
            }
            Ok::<_, Infallible>(resp)
        }
    };
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        // Boxed: the request's future is a few KiB, and HTTP/2 spawns it as
        // a task, which moves it three times. A box moves as a pointer.
        .serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| Box::pin(respond(req))),
        );
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%client, error = %e, "connection ended with an error");
            }
        }
        _ = closing.wait() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

impl crate::h1::server::Service for OnConnection {
    fn call(
        &self,
        req: Request<ProxyBody>,
    ) -> impl std::future::Future<Output = Response<ProxyBody>> + Send {
        self.alb.handle(
            req,
            &self.peer,
            &self.ctx,
            &self.tunnels,
            self.upstream_timer.as_ref(),
        )
    }

    fn refused(&self, reason: &'static str) {
        let metrics = self.alb.metrics();
        match reason {
            "header_timeout" => metrics.refused_header_timeout.inc(),
            _ => metrics.refused.with_label_values(&[reason]).inc(),
        }
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads until the first bytes tell HTTP/2 (the whole preface) from HTTP/1
/// (anything else): what was read, and `true` for HTTP/2; `None` if the
/// connection ended before a byte came. Undecided at `deadline`: what was
/// read, as HTTP/1. One read is usually enough, and it reads as much as a
/// request head needs.
async fn read_version<S>(
    stream: &mut S,
    deadline: tokio::time::Instant,
    timer: &ConnTimer,
) -> std::io::Result<Option<(bytes::BytesMut, bool)>>
where
    S: AsyncRead + Unpin,
{
    let mut buf = bytes::BytesMut::with_capacity(FIRST_READ);
    let http2 = loop {
        let before = buf.len();
        let read = std::future::poll_fn(|cx| {
            match tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut *stream), cx, &mut buf) {
                Poll::Pending => timer.poll_until(deadline, cx).map(|()| Ok(None)),
                ready => ready.map(|r| r.map(Some)),
            }
        })
        .await?;
        let Some(read) = read else {
            break false; // late: HTTP/1 answers it
        };
        if read == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            // Ended mid-way: HTTP/1 reads the rest, and the end.
            break false;
        }
        let n = buf.len().min(H2_PREFACE.len());
        if buf[before.min(n)..n] != H2_PREFACE[before.min(n)..n] {
            break false;
        }
        if n == H2_PREFACE.len() {
            break true;
        }
    };
    Ok(Some((buf, http2)))
}

/// How much the first read takes: a typical request head, whole.
const FIRST_READ: usize = 2048;

/// What the requests of one connection share.
struct OnConnection {
    alb: Arc<Alb>,
    ctx: Arc<Context>,
    tunnels: Tunnels,
    /// HTTP/1 only: the timer of the upstream answers' deadlines.
    upstream_timer: Option<ConnTimer>,
    peer: Peer,
}

/// The client end of a connection.
pub struct Peer {
    /// The client (the PROXY v2 source when the NLB sent one).
    pub addr: SocketAddr,
    /// Whether the client's connection is TLS.
    pub tls: bool,
    /// The client as the forwarding headers name it.
    pub names: headers::ClientNames,
}

/// The WebSocket tunnels a connection has become.
type Tunnels = Arc<parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>>;

/// A response the ALB makes itself: a one-line reason in plain text.
pub fn local(status: StatusCode, reason: impl Into<String>) -> Response<ProxyBody> {
    let mut body = reason.into();
    body.push('\n');
    let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// An answer the ALB gives before reading the request's body. The body is
/// kept until the answer is out: dropping it first makes HTTP/2 reset the
/// stream (CANCEL), and the client would never see the answer.
fn hold_request(req: Request<ProxyBody>, resp: Response<ProxyBody>) -> Response<ProxyBody> {
    let body = req.into_body();
    if body.is_end_stream() {
        return resp;
    }
    keeping(resp, body)
}

/// A response body that keeps something alive until it is done: the
/// request's body (see [`hold_request`]), or the endpoint's in-flight count.
struct Keeping<T> {
    answer: ProxyBody,
    _kept: T,
}

/// `resp` with `kept` dropped only after its body.
fn keeping<T: Send + Sync + Unpin + 'static>(
    resp: Response<ProxyBody>,
    kept: T,
) -> Response<ProxyBody> {
    resp.map(|answer| {
        Keeping {
            answer,
            _kept: kept,
        }
        .boxed()
    })
}

impl<T: Unpin> http_body::Body for Keeping<T> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.answer).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.answer.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.answer.size_hint()
    }
}

/// An upstream answer's body as the client gets it (its errors boxed),
/// with what must live as long as it (the endpoint's in-flight count).
struct Forwarded<B, T> {
    body: B,
    _kept: T,
}

impl<B, T> http_body::Body for Forwarded<B, T>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    T: Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.body)
            .poll_frame(cx)
            .map(|frame| frame.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// What the log and metrics need about one request. Nothing in it is
/// copied per request: the host is the request's own header value (or the
/// `:authority`), route and cluster names are shared with the route table,
/// and the path is kept only when the access log is on.
pub struct Exchange {
    pub started: Instant,
    pub client: SocketAddr,
    pub method: Method,
    /// The host the request is for (`:authority`, else `Host`), as routing
    /// and the origin see it; `None` when it names none.
    pub host: Option<HeaderValue>,
    /// Whether `host` is the request's own `Host` header, which the origin
    /// then gets as it is.
    pub host_is_header: bool,
    /// The path, for the access log (`None` when it is off).
    pub path: Option<String>,
    pub route: Option<Arc<str>>,
    /// The route's metric series, when it has them (else they are looked
    /// up by the route's name at the end).
    pub route_metrics: Option<Arc<crate::metrics::RouteMetrics>>,
    pub cluster: Option<Arc<str>>,
    pub endpoint: Option<Arc<crate::cluster::Endpoint>>,
    pub attempts: u32,
}

impl Exchange {
    /// The host as text (empty when the request names none).
    pub fn host(&self) -> &str {
        self.host
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default()
    }
}

/// Where one attempt goes, and what it carries along.
#[derive(Clone, Copy)]
struct Hop<'a> {
    ex: &'a Exchange,
    peer: &'a Peer,
    upstream: &'a Upstream,
    /// The endpoint's index in the cluster.
    endpoint: usize,
    rid: &'a HeaderValue,
}

/// How many headers [`Alb::upstream_request`] may add: the four forwarding
/// headers, `x-request-id` and `Host`.
const ADDED_HEADERS: usize = 6;

/// Methods safe to send twice (RFC 9110 §9.2.2).
pub(crate) fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// A request's `Host` headers, looked up once for routing and admission's
/// checks: the first, and whether there is another.
#[derive(Clone, Copy)]
struct HostHeader<'a> {
    first: Option<&'a HeaderValue>,
    repeated: bool,
}

impl<'a> HostHeader<'a> {
    fn of<B>(req: &'a Request<B>) -> Self {
        let mut all = req.headers().get_all(header::HOST).iter();
        HostHeader {
            first: all.next(),
            repeated: all.next().is_some(),
        }
    }
}

/// The host a request is for: HTTP/2's `:authority` (or an absolute
/// HTTP/1 target's), else `Host`; and whether it is the `Host` header
/// itself. `None` when it names no host.
fn host_of<B>(req: &Request<B>, host_header: HostHeader<'_>) -> (Option<HeaderValue>, bool) {
    if let Some(a) = req.uri().authority() {
        // Never a `user@` part: it names no host.
        let host = a.as_str().rsplit('@').next().unwrap_or_default();
        if host.is_empty() {
            return (None, false);
        }
        return (HeaderValue::from_str(host).ok(), false);
    }
    match host_header.first {
        // The header value itself (a reference count, not a copy).
        Some(h) if !h.is_empty() && h.to_str().is_ok() => (Some(h.clone()), true),
        _ => (None, false),
    }
}

impl Alb {
    /// Handles one request end to end.
    pub async fn handle(
        self: &Arc<Self>,
        req: Request<ProxyBody>,
        peer: &Peer,
        ctx: &Context,
        tunnels: &Tunnels,
        upstream_timer: Option<&ConnTimer>,
    ) -> Response<ProxyBody> {
        let rid = headers::request_id(req.headers());
        let (limits, access_log) = self.request_settings();
        let host_header = HostHeader::of(&req);
        let (host, host_is_header) = host_of(&req, host_header);
        let mut ex = Exchange {
            started: Instant::now(),
            client: peer.addr,
            method: req.method().clone(),
            host,
            host_is_header,
            path: access_log.then(|| req.uri().path().to_string()),
            route: None,
            route_metrics: None,
            cluster: None,
            endpoint: None,
            attempts: 0,
        };
        let max_body = limits.max_body_bytes;
        let mut resp = match self.admit(&req, host_header, &mut ex, ctx, &limits) {
            Err(early) => hold_request(req, *early),
            Ok(upstream) => {
                if headers::is_websocket_upgrade(req.headers()) && req.version() == Version::HTTP_11
                {
                    // Rare: boxed, so it does not make every request's
                    // future larger.
                    Box::pin(self.upgrade(req, &mut ex, (peer, tunnels), &upstream, &rid)).await
                } else {
                    self.forward(
                        req,
                        &mut ex,
                        (peer, upstream_timer),
                        &upstream,
                        &rid,
                        max_body,
                    )
                    .await
                }
            }
        };
        resp.headers_mut().insert(X_REQUEST_ID, rid);
        self.finish(&ex, resp.status(), ctx, access_log);
        resp
    }

    /// Limits, route, rate limits and the cluster: the upstream to send
    /// the request to, or the answer the ALB gives itself.
    fn admit(
        &self,
        req: &Request<ProxyBody>,
        host_header: HostHeader<'_>,
        ex: &mut Exchange,
        ctx: &Context,
        limits: &crate::config::Limits,
    ) -> Result<Arc<Upstream>, Box<Response<ProxyBody>>> {
        let metrics = self.metrics();
        let too_large = |why: String| {
            metrics
                .refused
                .with_label_values(&["header_too_large"])
                .inc();
            Err(Box::new(local(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                why,
            )))
        };
        // HTTP/2's header list, against the same limits as an HTTP/1 head
        // (which the ALB's HTTP/1 server has held to them already). The
        // URI's length from its parts: no string is built for it.
        let http2 = req.version() == Version::HTTP_2;
        let max_head = limits.max_header_bytes;
        if http2 {
            let uri = req.uri();
            let uri_len = uri.scheme_str().map_or(0, |s| s.len() + 3)
                + uri.authority().map_or(0, |a| a.as_str().len())
                + uri.path_and_query().map_or(0, |p| p.as_str().len());
            let head: usize = uri_len
                + req
                    .headers()
                    .iter()
                    .map(|(k, v)| k.as_str().len() + v.len() + 4)
                    .sum::<usize>();
            if head > max_head {
                return too_large(format!(
                    "the request's headers are larger than {max_head} bytes"
                ));
            }
        }
        // A reverse proxy opens no tunnels: a 2xx answer to CONNECT would
        // turn the upstream connection into one.
        if req.method() == Method::CONNECT {
            metrics.refused.with_label_values(&["method"]).inc();
            return Err(Box::new(local(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not proxied: the ALB is a reverse proxy",
            )));
        }
        // HTTP/2 has no head size hyper counts headers by: count them here.
        let max_headers = limits.max_headers;
        if http2 && req.headers().len() > max_headers {
            return too_large(format!("the request has more than {max_headers} headers"));
        }
        // One host per request: the request target's authority and `Host`
        // must agree, or the ALB would route on one and the origin serve
        // the other.
        if host_header.repeated {
            return Err(Box::new(local(
                StatusCode::BAD_REQUEST,
                "the request has more than one Host header",
            )));
        }
        if let (Some(authority), Some(h)) = (
            req.uri().authority(),
            host_header.first.and_then(|h| h.to_str().ok()),
        ) {
            let a = authority.as_str().rsplit('@').next().unwrap_or_default();
            if !a.eq_ignore_ascii_case(h.trim()) {
                return Err(Box::new(local(
                    StatusCode::BAD_REQUEST,
                    format!("Host {h:?} differs from the request's authority {a:?}"),
                )));
            }
        }
        let routes = self.routes();
        let host = Some(ex.host()).filter(|h| !h.is_empty());
        let Some(route) = routes.find(host, req.uri().path(), req.headers()) else {
            metrics.refused.with_label_values(&["no_route"]).inc();
            return Err(Box::new(local(
                StatusCode::NOT_FOUND,
                format!(
                    "no route for host {:?} and path {:?}",
                    ex.host(),
                    req.uri().path()
                ),
            )));
        };
        ex.route = Some(route.shared_id().clone());
        ex.route_metrics = route.metrics().cloned();
        ex.cluster = Some(route.shared_cluster().clone());
        // Keys are built only when limits exist: the common case pays
        // nothing for rate limiting.
        let limited = if ctx.limits.is_empty() {
            Ok(())
        } else {
            let route_key = format!("route:{}", route.id());
            // The host as routing sees it (no port, no trailing dot), so a
            // port or a dot cannot slip past a host's limit.
            let mut buf = [0u8; crate::routes::MAX_HOST_LEN];
            let host = crate::routes::normalize_host(ex.host(), &mut buf).unwrap_or("");
            let host_key = format!("host:{host}");
            ctx.limits
                .check(&["*", &route_key, &host_key], Some(ex.client.ip()))
        };
        if let Err(refused) = limited {
            metrics.refused.with_label_values(&["rate_limited"]).inc();
            let mut r = local(
                StatusCode::TOO_MANY_REQUESTS,
                format!("rate limited by {} on {}", refused.limit_id, refused.target),
            );
            if let Ok(v) = HeaderValue::from_str(&refused.retry_after_secs().to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return Err(Box::new(r));
        }
        let max_body = limits.max_body_bytes;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max_body) {
            metrics.refused.with_label_values(&["body_too_large"]).inc();
            return Err(Box::new(local(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is larger than {max_body} bytes"),
            )));
        }
        let Some(upstream) = self.upstream(route.cluster()) else {
            metrics.refused.with_label_values(&["no_cluster"]).inc();
            return Err(Box::new(local(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "route {} sends to cluster {:?}, which is not configured",
                    route.id(),
                    route.cluster()
                ),
            )));
        };
        Ok(upstream)
    }

    /// The upstream request for `endpoint`: the client's method, path,
    /// headers (hop-by-hop removed, forwarding added) and `body`.
    fn upstream_request(
        &self,
        parts: &http::request::Parts,
        hop: &Hop<'_>,
        body: ProxyBody,
        keep_upgrade: bool,
    ) -> Result<Outgoing, http::Error> {
        let Hop {
            ex,
            peer,
            upstream,
            endpoint,
            rid,
        } = *hop;
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        // Made where it is returned from, and filled in there: a request
        // is a few hundred bytes, and each move of it a copy.
        let mut out = Outgoing::from(Request::new(body));
        let r = &mut out.req;
        *r.method_mut() = parts.method.clone();
        *r.uri_mut() = upstream.uri(endpoint, path)?;
        *r.version_mut() = upstream.protocol.version();
        // The origin gets the host the request was routed on (already
        // there when it is the request's own `Host`).
        let new_host = ex.host.as_ref().filter(|_| !ex.host_is_header);
        if upstream.protocol == UpstreamProtocol::Http1 && !keep_upgrade {
            // To an HTTP/1.1 origin the head goes as bytes made here: the
            // client's fields as they came (less the hop-by-hop ones and
            // those rewritten), then this hop's.
            let mut head = Vec::with_capacity(512);
            crate::h1::request_line(&mut head, &parts.method, r.uri());
            let named = headers::write_end_to_end(&mut head, &parts.headers, |name| {
                headers::set_by_proxy(name)
                    || name == header::CONTENT_LENGTH
                    || name == header::TRANSFER_ENCODING
                    || (new_host.is_some() && name == header::HOST)
            });
            headers::write_forwarding(
                &mut head,
                &parts.headers,
                &named,
                &peer.names,
                peer.tls,
                ex.host.as_ref(),
            );
            headers::put_line(&mut head, b"x-request-id", rid.as_bytes());
            if let Some(v) = new_host {
                headers::put_line(&mut head, b"host", v.as_bytes());
            }
            out.head = Some(head);
            return Ok(out);
        }
        // A copy with room for the headers added below: a clone has none
        // (its entries exactly fill their vector), so each of the inserts
        // that follow would grow it again. Cloned, then grown once: the
        // clone copies the table as it is, where appending each header
        // would hash its name again.
        let h = r.headers_mut();
        *h = parts.headers.clone();
        h.reserve(ADDED_HEADERS);
        headers::strip_hop_by_hop(h, keep_upgrade);
        headers::add_forwarding(h, &peer.names, peer.tls, ex.host.as_ref());
        h.insert(X_REQUEST_ID, rid.clone());
        if let Some(v) = new_host {
            h.insert(header::HOST, v.clone());
        }
        Ok(out)
    }

    async fn forward(
        self: &Arc<Self>,
        req: Request<ProxyBody>,
        ex: &mut Exchange,
        (peer, timer): (&Peer, Option<&ConnTimer>),
        upstream: &Arc<Upstream>,
        rid: &HeaderValue,
        max_body: u64,
    ) -> Response<ProxyBody> {
        let metrics = self.metrics();
        let cluster_name = upstream.cluster.name();
        let (parts, incoming) = req.into_parts();
        let empty_body = incoming.is_end_stream();
        // Whether reading the client's body failed: then the failure is the
        // client's, not the endpoint's. A body known to be empty (most
        // requests) cannot fail and goes as an empty body that says the
        // same (ended, length 0): no flag, no limit, nothing allocated.
        let (body, client_failed): (ProxyBody, _) =
            if empty_body && incoming.size_hint().exact() == Some(0) {
                (Empty::new().map_err(|e| match e {}).boxed(), None)
            } else {
                let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let flag = failed.clone();
                let body = Limited::new(incoming, usize::try_from(max_body).unwrap_or(usize::MAX))
                    .map_err(move |e| {
                        flag.store(true, std::sync::atomic::Ordering::Relaxed);
                        BoxError::from(e)
                    })
                    .boxed();
                (body, Some(failed))
            };
        // A request can go again only when nothing of it is lost by
        // sending it: no body, and a method safe to repeat (a connect
        // failure never sent anything, so it may go again with no body).
        let mut body = Some(body);
        // The endpoints tried so far, on the stack (a `Vec` cost an
        // allocation per request): at most one per attempt.
        let attempts = upstream
            .cluster
            .spec()
            .retry
            .attempts
            .clamp(1, MAX_ATTEMPTS);
        let mut tried = [0usize; MAX_ATTEMPTS as usize];
        let mut tried_len = 0;
        upstream.cluster.request_started_at(ex.started);
        // The answer of the last failed attempt: what the client gets if no
        // untried endpoint is left for a retry.
        let mut last_failure: Option<Response<ProxyBody>> = None;
        loop {
            // The first attempt picks at the request's start (one clock
            // reading fewer); a retry reads the clock again.
            let now = if ex.attempts == 0 {
                ex.started
            } else {
                Instant::now()
            };
            let Some(pick) = upstream.cluster.pick_at(&tried[..tried_len], now) else {
                if let Some(failure) = last_failure {
                    return failure;
                }
                metrics.refused.with_label_values(&["no_endpoint"]).inc();
                return local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("cluster {cluster_name} has no endpoint that can take the request"),
                );
            };
            if ex.attempts > 0 {
                metrics.retries.with_label_values(&[cluster_name]).inc();
            }
            if let Some(slot) = tried.get_mut(tried_len) {
                *slot = pick.index;
                tried_len += 1;
            }
            ex.attempts += 1;
            ex.endpoint = Some(pick.endpoint.clone());
            let this_body = match body.take() {
                Some(b) => b,
                None => Full::new(Bytes::new()).map_err(|e| match e {}).boxed(),
            };
            let upstream_req = match self.upstream_request(
                &parts,
                &Hop {
                    ex,
                    peer,
                    upstream,
                    endpoint: pick.index,
                    rid,
                },
                this_body,
                false,
            ) {
                Ok(r) => r,
                Err(e) => {
                    return local(
                        StatusCode::BAD_REQUEST,
                        format!("the request cannot be forwarded: {e}"),
                    )
                }
            };
            let in_flight = pick.endpoint.start();
            // The attempt's deadline from when it is sent (the first one's
            // from the request's start: nothing was awaited since).
            let deadline = tokio::time::Instant::from_std(now) + upstream.request_timeout;
            let sent = within(
                timer,
                deadline,
                upstream.pools[pick.index].send(upstream_req),
            )
            .await;
            // Only a request without a body can go again (its body is gone
            // once sent): after a connect failure (nothing reached the
            // endpoint) always, after a failed answer if the method is safe
            // to repeat; and only within the cluster's retry budget.
            let retry = |connect_failure: bool| {
                ex.attempts < attempts
                    && empty_body
                    && (connect_failure || idempotent(&parts.method))
                    && upstream.cluster.may_retry()
            };
            let (failure, may_go_again) = match sent {
                Some(Ok(resp)) => {
                    let status = resp.status().as_u16();
                    upstream.cluster.report(
                        pick.index,
                        if status >= 500 {
                            Outcome::Status(status)
                        } else {
                            Outcome::Success
                        },
                    );
                    let again = matches!(status, 502..=504) && retry(false);
                    if !again {
                        // In flight until the last byte of the answer: a
                        // long download or a gRPC stream counts for
                        // least_request as long as it lasts.
                        return self.downstream_response(resp, Some(in_flight));
                    }
                    (self.downstream_response(resp, ()), true)
                }
                Some(Err(e)) => {
                    // The client's body over the limit is the client's
                    // doing, not the endpoint's: no outcome reported.
                    if body_too_large(&e) {
                        metrics.refused.with_label_values(&["body_too_large"]).inc();
                        return local(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            format!("the request body is larger than {max_body} bytes"),
                        );
                    }
                    if client_failed
                        .as_ref()
                        .is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed))
                    {
                        metrics.refused.with_label_values(&["client_body"]).inc();
                        return local(
                            StatusCode::BAD_REQUEST,
                            format!("the request body did not arrive whole: {}", root_cause(&e)),
                        );
                    }
                    let connect = e.is_connect();
                    upstream.cluster.report(
                        pick.index,
                        if connect {
                            Outcome::ConnectFailure
                        } else {
                            Outcome::Status(502)
                        },
                    );
                    metrics
                        .upstream_errors
                        .with_label_values(&[
                            cluster_name,
                            if connect { "connect" } else { "protocol" },
                        ])
                        .inc();
                    let what = if connect {
                        format!(
                            "could not connect to cluster {cluster_name} endpoint {}: {}",
                            pick.endpoint.address(),
                            root_cause(&e)
                        )
                    } else {
                        format!(
                            "cluster {cluster_name} endpoint {} failed: {}",
                            pick.endpoint.address(),
                            root_cause(&e)
                        )
                    };
                    (local(StatusCode::BAD_GATEWAY, what), retry(connect))
                }
                None => {
                    upstream.cluster.report(pick.index, Outcome::Timeout);
                    metrics
                        .upstream_errors
                        .with_label_values(&[cluster_name, "timeout"])
                        .inc();
                    let failure = local(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!(
                            "cluster {cluster_name} endpoint {} did not answer within {} ms",
                            pick.endpoint.address(),
                            upstream.request_timeout.as_millis()
                        ),
                    );
                    (failure, retry(false))
                }
            };
            if !may_go_again {
                return failure;
            }
            last_failure = Some(failure);
        }
    }

    /// The upstream's response as the client gets it; `kept` is dropped
    /// after its body (one box for both, where mapping the error and
    /// keeping took one each).
    fn downstream_response<B, T>(&self, resp: Response<B>, kept: T) -> Response<ProxyBody>
    where
        B: http_body::Body<Data = Bytes> + Send + Sync + Unpin + 'static,
        B::Error: Into<BoxError>,
        T: Send + Sync + Unpin + 'static,
    {
        let (mut parts, body) = resp.into_parts();
        // The client's connection has its own version: an HTTP/1.0 origin
        // does not make the answer HTTP/1.0.
        parts.version = Version::HTTP_11;
        let upgrade = parts.status == StatusCode::SWITCHING_PROTOCOLS;
        headers::strip_hop_by_hop(&mut parts.headers, upgrade);
        Response::from_parts(parts, Forwarded { body, _kept: kept }.boxed())
    }

    /// A WebSocket (HTTP/1.1 upgrade): forwarded with its upgrade headers;
    /// on 101 both sides are joined and bytes copied until either closes.
    async fn upgrade(
        self: &Arc<Self>,
        mut req: Request<ProxyBody>,
        ex: &mut Exchange,
        (peer, tunnels): (&Peer, &Tunnels),
        upstream: &Arc<Upstream>,
        rid: &HeaderValue,
    ) -> Response<ProxyBody> {
        let cluster_name = upstream.cluster.name();
        let Some(pick) = upstream.cluster.pick(&[]) else {
            self.metrics()
                .refused
                .with_label_values(&["no_endpoint"])
                .inc();
            return local(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cluster {cluster_name} has no endpoint that can take the request"),
            );
        };
        ex.attempts = 1;
        ex.endpoint = Some(pick.endpoint.clone());
        let Some(downstream) = req
            .extensions_mut()
            .remove::<crate::h1::server::OnUpgrade>()
        else {
            return local(
                StatusCode::BAD_REQUEST,
                "this connection cannot be upgraded",
            );
        };
        let (parts, _) = req.into_parts();
        let empty = Full::new(Bytes::new()).map_err(|e| match e {}).boxed();
        let up_req = match self.upstream_request(
            &parts,
            &Hop {
                ex,
                peer,
                upstream,
                endpoint: pick.index,
                rid,
            },
            empty,
            true,
        ) {
            Ok(r) => r,
            Err(e) => return local(StatusCode::BAD_REQUEST, format!("bad upgrade request: {e}")),
        };
        let in_flight = pick.endpoint.start();
        let sent = tokio::time::timeout(
            upstream.request_timeout,
            upstream.pools[pick.index].send_upgrade(up_req.req),
        )
        .await;
        let mut resp = match sent {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                upstream.cluster.report(pick.index, Outcome::ConnectFailure);
                return local(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "cluster {cluster_name} endpoint {} failed the upgrade: {}",
                        pick.endpoint.address(),
                        root_cause(&e)
                    ),
                );
            }
            Err(_) => {
                upstream.cluster.report(pick.index, Outcome::Timeout);
                return local(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "cluster {cluster_name} endpoint {} did not answer the upgrade in time",
                        pick.endpoint.address()
                    ),
                );
            }
        };
        upstream.cluster.report(pick.index, Outcome::Success);
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upstream_io = hyper::upgrade::on(&mut resp);
            let tunnel = tokio::spawn(async move {
                let _in_flight = in_flight;
                let (Some(down), Ok(up)) = (downstream.await, upstream_io.await) else {
                    return;
                };
                let mut down = down;
                let mut up = TokioIo::new(up);
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            });
            // The connection lives on as this tunnel: it stays tracked
            // (drain, shed, counts) until the tunnel ends.
            tunnels.lock().push(tunnel);
        }
        self.downstream_response(resp, ())
    }

    /// Metrics, stats and the access log line.
    fn finish(&self, ex: &Exchange, status: StatusCode, ctx: &Context, access_log: bool) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(ex.started);
        let route = ex.route.as_deref().unwrap_or("-");
        match &ex.route_metrics {
            Some(m) => m.record(status.as_u16(), elapsed.as_secs_f64()),
            None => self
                .route_metrics(route)
                .record(status.as_u16(), elapsed.as_secs_f64()),
        }
        ctx.stats
            .record_request_at(elapsed, status.as_u16() < 500, now);
        if access_log {
            tracing::info!(
                target: "access",
                client = %ex.client,
                method = %ex.method,
                host = ex.host(),
                path = ex.path.as_deref().unwrap_or_default(),
                status = status.as_u16(),
                route,
                cluster = ex.cluster.as_deref().unwrap_or("-"),
                endpoint = ex.endpoint.as_ref().map_or("-", |e| e.address()),
                attempts = ex.attempts,
                duration_ms = elapsed.as_secs_f64() * 1000.0,
            );
        }
    }
}

/// `fut`'s output, or `None` if it is not done by `deadline`: on the
/// connection's timer when it has one (HTTP/1), else on a timer of its own.
/// `fut` is polled first, as `tokio::time::timeout_at` does.
///
/// A future of its own rather than an `async fn`: an `async fn` keeps its
/// argument and the pinned copy it awaits side by side, and this one holds
/// the request's whole upstream exchange.
fn within<F: std::future::Future>(
    timer: Option<&ConnTimer>,
    deadline: tokio::time::Instant,
    fut: F,
) -> Within<'_, F> {
    Within {
        fut,
        timer,
        deadline,
        own: None,
    }
}

pin_project_lite::pin_project! {
    /// See [`within`].
    struct Within<'t, F> {
        #[pin]
        fut: F,
        timer: Option<&'t ConnTimer>,
        deadline: tokio::time::Instant,
        // Made only when there is no connection timer, and only if `fut`
        // is not done at once.
        #[pin]
        own: Option<tokio::time::Sleep>,
    }
}

impl<F: std::future::Future> std::future::Future for Within<'_, F> {
    type Output = Option<F::Output>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(v) = this.fut.poll(cx) {
            return Poll::Ready(Some(v));
        }
        let passed = match this.timer {
            Some(timer) => timer.poll_until(*this.deadline, cx),
            None => {
                if this.own.is_none() {
                    this.own.set(Some(tokio::time::sleep_until(*this.deadline)));
                }
                this.own.as_pin_mut().map_or(Poll::Pending, |s| s.poll(cx))
            }
        };
        passed.map(|()| None)
    }
}

/// The innermost error's text (hyper's outer ones say little).
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Whether a client error came from the request body's size limit.
fn body_too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}
