//! The ALB's HTTP/1.1 server: a client's connection, one request after
//! another (pipelined ones in order).
//!
//! Each request head is parsed in place (its header values are slices of
//! the bytes read, not copies), framed strictly (RFC 9112 §6.3: a
//! `Transfer-Encoding` other than `chunked`, or one beside a
//! `Content-Length`, is refused, as request smuggling rides on them), and
//! handed to the [`Service`] with a body that reads the connection as it is
//! polled. The answer's head and as much of its body as is ready go out in
//! one write. The limits are the ALB's: a head over `max_header_bytes` or
//! with more than `max_headers` lines is answered `431`, and a head that
//! does not arrive within `header_read_timeout_ms` `408` (a connection idle
//! between requests is closed without a word).
//!
//! A request whose body was not read to its end (answered early, a `413`)
//! ends its connection: the answer says `Connection: close`, and what the
//! client still sends is read and dropped for a while before the close, so
//! that the client reads the answer rather than a reset.

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::{DATE, EXPECT, TE, UPGRADE};
use http::uri::Uri;
use http_body_util::BodyExt;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::framing::{content_length, Chunk, Decoder, Kind};
pub use super::incoming::{BodyError, OnUpgrade, Upgraded};
use super::incoming::{Continue, Link, RequestBody, Shared};
use super::request::{put_field, put_header};
use super::RawHead;
use super::*;
use crate::conn_timer::ConnTimer;
use std::task::ready;

/// What serves the requests of a connection.
pub trait Service {
    /// The answer to `req`.
    fn call(&self, req: Request<ProxyBody>) -> impl Future<Output = Response<ProxyBody>> + Send;
    /// Counts a request the server answered itself (`reason` as in
    /// `alb_refused_total`).
    fn refused(&self, reason: &'static str);
}

/// The limits a connection is served under.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Largest request head, request line included.
    pub max_head: usize,
    /// Most header lines in a request head.
    pub max_headers: usize,
    /// How long a request head may take to arrive.
    pub header_timeout: Duration,
}

/// Answer bytes gathered before they are written.
const WRITE_SIZE: usize = 64 * 1024;
/// The room a connection's answers start with.
const OUT_SIZE: usize = 4096;
/// Header slots on the stack; more (a higher `max_headers`) are allocated.
const STACK_HEADERS: usize = 100;
/// After an answer that leaves a request body unread: how long, and how
/// many bytes, the client's remaining bytes are read and dropped before
/// the connection closes.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1024 * 1024;

const TIMEOUT_408: &[u8] = crate::deadline::RESPONSE;

/// Serves `io` until the client is done, the connection breaks, or
/// `closing` says to finish (the request under way is answered first, with
/// `Connection: close`). `read` holds what has been read from it already;
/// the first request's head is due by `first_deadline`.
pub async fn serve<S, Svc>(
    io: S,
    read: BytesMut,
    first_deadline: Instant,
    settings: Settings,
    timer: &ConnTimer,
    mut closing: switchyard_sdk::data::Closing,
    service: &Svc,
) where
    S: Io + 'static,
    Svc: Service + Sync,
{
    let link: Shared<S> = Arc::new(Mutex::new(Link {
        io,
        buf: read,
        body: Decoder::new(Kind::Done),
        expect: Continue::No,
        broken: false,
    }));
    // The answers' bytes, gathered for one write: room for a head and a
    // small body from the start.
    let mut out = Vec::with_capacity(OUT_SIZE);
    let mut deadline = Some(first_deadline);
    let mut first = true;
    let probe = closing.clone();
    let mut close_wait = std::pin::pin!(closing.wait());
    let mut closing_seen = false;
    loop {
        let waited = std::future::poll_fn(|cx| {
            poll_head(&link, &settings, cx, &mut deadline, timer, |cx| {
                if !closing_seen && close_wait.as_mut().poll(cx).is_ready() {
                    closing_seen = true;
                }
                closing_seen
            })
        })
        .await;
        let head = match waited {
            Waited::Head(head) => head,
            Waited::Done => {
                shut(&link).await;
                return;
            }
            Waited::Late { any } => {
                if any || first {
                    service.refused("header_timeout");
                    let _ = write_out(&link, TIMEOUT_408).await;
                    linger(&link, timer).await;
                }
                return;
            }
            Waited::Refused(refusal) => {
                service.refused(refusal.reason);
                out.clear();
                refusal.encode(&mut out);
                if write_out(&link, &out).await.is_ok() {
                    linger(&link, timer).await;
                }
                return;
            }
        };
        first = false;
        let Head {
            mut req,
            mut meta,
            body,
        } = head;
        if body != Kind::Done {
            let mut l = link.lock();
            l.body = Decoder::new(body);
            l.expect = if meta.expect_continue {
                Continue::Owed
            } else {
                Continue::No
            };
            drop(l);
            *req.body_mut() = RequestBody { link: link.clone() }
                .map_err(BoxError::from)
                .boxed();
        }
        let upgraded = meta.upgrade.then(|| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            req.extensions_mut().insert(OnUpgrade::new(rx));
            tx
        });
        // The answer, unless the client goes first: then the exchange is
        // dropped (the upstream request with it), as nginx and hyper do.
        // (Pinned where it is made: a named future moved into the pin
        // would take its room twice in this future.)
        let mut call = std::pin::pin!(service.call(req));
        let answered = std::future::poll_fn(|cx| {
            if let Poll::Ready(resp) = call.as_mut().poll(cx) {
                return Poll::Ready(Some(resp));
            }
            if client_gone(&link, settings.max_head, cx) {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        let Some(resp) = answered else {
            tracing::debug!("the client closed its connection before its answer");
            return;
        };
        meta.keep_alive &= !closing_seen && !probe.is_closing();
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS && upgraded.is_some();
        let written = respond(&link, resp, &mut meta, &mut out).await;
        if let Err(e) = written {
            tracing::debug!(error = %e, "the answer could not be written whole");
            return;
        }
        if switching {
            // The connection is the tunnel's now (the request's body, the
            // only other holder, is gone with the answer).
            if let (Some(tx), Ok(link)) = (upgraded, Arc::try_unwrap(link)) {
                let link = link.into_inner();
                let _ = tx.send(Upgraded::new(Box::new(link.io), link.buf));
            }
            return;
        }
        // A holder of the request's body left (an HTTP/2 upstream still
        // sending it, on a task of its own) reads no more of it: what
        // follows on the connection is not its.
        if Arc::strong_count(&link) > 1 {
            link.lock().abandon();
        }
        let reusable = meta.keep_alive && link.lock().skip_buffered_body();
        if !reusable {
            // With bytes from the client unread, a close would reset the
            // connection, and the client could lose the answer: those are
            // read and dropped first (as nginx's lingering close).
            let unread = {
                let l = link.lock();
                !l.body.is_done() || !l.buf.is_empty()
            };
            if unread {
                linger(&link, timer).await;
            } else {
                shut(&link).await;
            }
            return;
        }
        if out.capacity() > WRITE_SIZE * 2 {
            out = Vec::with_capacity(OUT_SIZE);
        }
        deadline = None;
    }
}

/// A request as the service gets it, and what the server keeps of it.
struct Head {
    req: Request<ProxyBody>,
    meta: Meta,
    body: Kind,
}

/// What the answer's framing depends on.
struct Meta {
    /// The client speaks HTTP/1.0.
    http10: bool,
    /// The connection may serve another request after this one.
    keep_alive: bool,
    /// A `HEAD` request: the answer has no body, whatever its headers say.
    head_only: bool,
    expect_continue: bool,
    /// The client asks to switch protocols (`Connection: upgrade` with an
    /// `Upgrade` header).
    upgrade: bool,
    /// `TE: trailers`: the client takes trailers in a chunked answer.
    trailers: bool,
}

/// A request the server answers itself, and closes the connection after.
struct Refusal {
    status: StatusCode,
    /// Its `alb_refused_total` reason.
    reason: &'static str,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            status,
            reason,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Refusal::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn encode(&self, out: &mut Vec<u8>) {
        status_line(out, self.status);
        out.extend_from_slice(b"content-type: text/plain; charset=utf-8\r\ncontent-length: ");
        out.extend_from_slice(
            itoa::Buffer::new()
                .format(self.message.len() + 1)
                .as_bytes(),
        );
        out.extend_from_slice(b"\r\nconnection: close\r\n");
        put_date(out);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(self.message.as_bytes());
        out.push(b'\n');
    }
}

// Made once per request and moved once: a box for the head would cost an
// allocation each time.
#[allow(clippy::large_enum_variant)]
enum Waited {
    Head(Head),
    /// The client closed (or the server is closing) between requests.
    Done,
    /// The deadline passed; `any`: part of a head had come.
    Late {
        any: bool,
    },
    Refused(Refusal),
}

/// Reads until a request head is whole, the deadline passes, or the client
/// goes. `closing` polls the close signal (true once it has come).
fn poll_head<S: Io>(
    link: &Shared<S>,
    settings: &Settings,
    cx: &mut Context<'_>,
    deadline: &mut Option<Instant>,
    timer: &ConnTimer,
    mut closing: impl FnMut(&mut Context<'_>) -> bool,
) -> Poll<Waited> {
    let mut guard = link.lock();
    let l = &mut *guard;
    loop {
        if !l.buf.is_empty() {
            match parse(&l.buf, settings) {
                Err(refusal) => return Poll::Ready(Waited::Refused(refusal)),
                Ok(Some(parsed)) => {
                    let bytes = l.buf.split_to(parsed.len).freeze();
                    return Poll::Ready(match parsed.build(&bytes) {
                        Ok(head) => Waited::Head(head),
                        Err(refusal) => Waited::Refused(refusal),
                    });
                }
                Ok(None) if l.buf.len() > settings.max_head => {
                    return Poll::Ready(Waited::Refused(too_large(settings.max_head)))
                }
                Ok(None) => {}
            }
        }
        match poll_read(&mut l.io, &mut l.buf, cx) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Waited::Done),
            Poll::Ready(Ok(_)) => continue,
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "reading a request head");
                return Poll::Ready(Waited::Done);
            }
            Poll::Pending => {}
        }
        // Waiting: a connection idle between requests ends when the ALB
        // closes; one in the middle of a head has until its deadline.
        if l.buf.is_empty() && closing(cx) {
            return Poll::Ready(Waited::Done);
        }
        let due = *deadline.get_or_insert_with(|| Instant::now() + settings.header_timeout);
        return match timer.poll_until(due, cx) {
            Poll::Ready(()) => Poll::Ready(Waited::Late {
                any: !l.buf.is_empty(),
            }),
            Poll::Pending => Poll::Pending,
        };
    }
}

fn too_large(max: usize) -> Refusal {
    Refusal::new(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "header_too_large",
        format!("the request's headers are larger than {max} bytes"),
    )
}

/// A request head as parsed, before its values are taken out of the bytes.
struct Parsed {
    len: usize,
    method: Method,
    http10: bool,
    target: Range<usize>,
    /// Each header's name, and its value's place in the head.
    headers: Vec<(HeaderName, Range<usize>)>,
}

/// Parses a request head from the start of `buf`: `None` if more is
/// needed.
fn parse(buf: &[u8], settings: &Settings) -> Result<Option<Parsed>, Refusal> {
    let max = settings.max_headers;
    if max <= STACK_HEADERS {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
        parse_with(buf, settings, &mut slots[..max])
    } else {
        let mut slots: Vec<_> = (0..max).map(|_| MaybeUninit::uninit()).collect();
        parse_with(buf, settings, &mut slots)
    }
}

fn parse_with<'b>(
    buf: &'b [u8],
    settings: &Settings,
    slots: &mut [MaybeUninit<httparse::Header<'b>>],
) -> Result<Option<Parsed>, Refusal> {
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, slots)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "header_too_large",
                format!("the request has more than {} headers", settings.max_headers),
            ))
        }
        Err(e) => {
            return Err(Refusal::bad(format!(
                "the request head is not valid HTTP/1.1: {e}"
            )))
        }
    };
    if len > settings.max_head {
        return Err(too_large(settings.max_head));
    }
    let base = buf.as_ptr() as usize;
    let place = |s: &[u8]| {
        let start = (s.as_ptr() as usize)
            .checked_sub(base)
            .filter(|&start| start + s.len() <= len)
            .unwrap_or(0);
        start..start + if s.is_empty() { 0 } else { s.len() }
    };
    let method = Method::from_bytes(req.method.unwrap_or_default().as_bytes())
        .map_err(|_| Refusal::bad("the request's method is not a token"))?;
    let target = place(req.path.unwrap_or_default().as_bytes());
    let mut headers = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| Refusal::bad(format!("the header name {:?}", h.name)))?;
        headers.push((name, place(h.value)));
    }
    Ok(Some(Parsed {
        len,
        method,
        http10: req.version == Some(0),
        target,
        headers,
    }))
}

impl Parsed {
    /// The request with its values taken from `bytes` (the head's own
    /// bytes, shared, not copied), and its framing.
    fn build(self, bytes: &Bytes) -> Result<Head, Refusal> {
        let uri = Uri::from_maybe_shared(bytes.slice(self.target.clone())).map_err(|_| {
            Refusal::bad(format!(
                "the request target {:?}",
                String::from_utf8_lossy(&bytes[self.target])
            ))
        })?;
        let mut headers = HeaderMap::with_capacity(self.headers.len());
        let mut length = None;
        let mut chunked = None;
        let mut close = false;
        let mut keep_alive_asked = false;
        let mut connection_upgrade = false;
        let mut expect_continue = false;
        let mut trailers = false;
        for (name, range) in self.headers {
            let value = HeaderValue::from_maybe_shared(bytes.slice(range))
                .map_err(|_| Refusal::bad(format!("the value of header {name}")))?;
            // The headers that frame the message, read on the way.
            if name == CONTENT_LENGTH {
                length = content_length(value.as_bytes(), length).map_err(Refusal::bad)?;
            } else if name == TRANSFER_ENCODING {
                chunked = Some(transfer_coding(&value, chunked.is_some())?);
            } else if name == CONNECTION {
                for token in tokens(&value) {
                    close |= token.eq_ignore_ascii_case(b"close");
                    keep_alive_asked |= token.eq_ignore_ascii_case(b"keep-alive");
                    connection_upgrade |= token.eq_ignore_ascii_case(b"upgrade");
                }
            } else if name == EXPECT {
                expect_continue |= value.as_bytes().eq_ignore_ascii_case(b"100-continue");
            } else if name == TE {
                trailers |= tokens(&value).any(|t| t.eq_ignore_ascii_case(b"trailers"));
            }
            headers.append(name, value);
        }
        let body = match (chunked, length) {
            (Some(_), _) if self.http10 => {
                return Err(Refusal::bad("an HTTP/1.0 request with a Transfer-Encoding"))
            }
            (Some(_), Some(_)) => {
                return Err(Refusal::bad(
                    "the request has both a Transfer-Encoding and a Content-Length",
                ))
            }
            (Some(_), None) => Kind::Chunked(Chunk::Size),
            (None, Some(n)) if n > 0 => Kind::Length(n),
            (None, _) => Kind::Done,
        };
        let meta = Meta {
            http10: self.http10,
            keep_alive: !close && (!self.http10 || keep_alive_asked),
            head_only: self.method == Method::HEAD,
            expect_continue: expect_continue && !self.http10,
            upgrade: connection_upgrade && !self.http10 && headers.contains_key(UPGRADE),
            trailers,
        };
        let mut req = Request::new(http_body_util::Empty::new().map_err(|e| match e {}).boxed());
        *req.method_mut() = self.method;
        *req.uri_mut() = uri;
        *req.version_mut() = if self.http10 {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        *req.headers_mut() = headers;
        Ok(Head { req, meta, body })
    }
}

/// A `Transfer-Encoding` line: only `chunked` is taken, once, last (RFC
/// 9112 §6.3); `seen`: an earlier line named a coding.
fn transfer_coding(value: &HeaderValue, seen: bool) -> Result<bool, Refusal> {
    let mut codings = tokens(value).filter(|t| !t.is_empty());
    match (codings.next(), codings.next()) {
        (None, _) if seen => Ok(true),
        (None, _) => Err(Refusal::bad(
            "the request's Transfer-Encoding names no coding",
        )),
        (Some(c), None) if c.eq_ignore_ascii_case(b"chunked") && !seen => Ok(true),
        (Some(c), None) if c.eq_ignore_ascii_case(b"chunked") => Err(Refusal::bad(
            "the request's Transfer-Encoding names chunked twice",
        )),
        _ => Err(Refusal::new(
            StatusCode::NOT_IMPLEMENTED,
            "bad_request",
            format!(
                "Transfer-Encoding {:?}: only chunked is accepted",
                String::from_utf8_lossy(value.as_bytes())
            ),
        )),
    }
}

/// A comma-separated header value's tokens, trimmed.
fn tokens(value: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    value
        .as_bytes()
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
}

/// How an answer's body goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    /// No body (a `HEAD` request, `1xx`, `204`, `304`).
    None,
    /// This many bytes left.
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, length unknown).
    Close,
}

/// Writes `resp` to the client: its head, and its body as it comes.
/// `meta.keep_alive` ends up saying whether the connection can go on.
async fn respond<S: Io>(
    link: &Shared<S>,
    resp: Response<ProxyBody>,
    meta: &mut Meta,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    let bodiless = meta.head_only
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    // An HTTP/1.1 origin's head, passed on as it came (its hop-by-hop
    // fields gone), before the headers the ALB set.
    let raw = parts.extensions.get::<RawHead>();
    let in_headers = match parts.headers.get(CONTENT_LENGTH) {
        Some(v) => Some(
            content_length(v.as_bytes(), None)
                .ok()
                .flatten()
                .ok_or_else(|| format!("the answer's Content-Length {v:?}"))?,
        ),
        None => None,
    };
    let declared = in_headers.or(raw.and_then(|r| r.content_length));
    let mut framing = if bodiless {
        Out::None
    } else if let Some(n) = declared {
        Out::Length(n)
    } else if let Some(n) = body.size_hint().exact() {
        Out::Length(n)
    } else if meta.http10 {
        Out::Close
    } else {
        Out::Chunked
    };
    if framing == Out::Close {
        meta.keep_alive = false;
    }
    // A request body not read to its end by now is not waited for: the
    // connection closes after this answer. (One still held, which may yet
    // be sent on while the answer streams, is not skipped.)
    if meta.keep_alive && !link.lock().body.is_done() {
        let unheld = Arc::strong_count(link) == 1;
        meta.keep_alive = unheld && link.lock().skip_buffered_body();
    }
    out.clear();
    status_line(out, status);
    let mut has_date = false;
    if let Some(raw) = raw {
        for (name, value) in raw.fields() {
            // The ALB's own headers (`x-request-id`) replace the origin's.
            if parts.headers.keys().any(|own| own == name) {
                continue;
            }
            has_date |= name == DATE;
            put_field(out, name, value);
        }
    }
    for (name, value) in &parts.headers {
        if name == TRANSFER_ENCODING
            || (name == CONTENT_LENGTH
                && (status.is_informational() || status == StatusCode::NO_CONTENT))
        {
            continue;
        }
        if name == CONNECTION && status != StatusCode::SWITCHING_PROTOCOLS {
            continue;
        }
        has_date |= name == DATE;
        put_header(out, name, value);
    }
    // A bodiless answer to `HEAD` (or a `304`) says the length the body
    // would have, when known.
    let length = match framing {
        Out::Length(n) => Some(n),
        Out::None if status.is_informational() || status == StatusCode::NO_CONTENT => None,
        // (Not a zero measured: the upstream client's `HEAD` answer has no
        // body to measure, and a length of 0 would say something false.)
        Out::None if meta.head_only => {
            declared.or_else(|| body.size_hint().exact().filter(|&n| n > 0))
        }
        Out::None => declared,
        _ => None,
    };
    match (length, framing) {
        (Some(n), _) if in_headers.is_none() => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        (_, Out::Chunked) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    if !has_date {
        put_date(out);
    }
    if status != StatusCode::SWITCHING_PROTOCOLS {
        if !meta.keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        } else if meta.http10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    if framing == Out::None || body.is_end_stream() {
        if let Out::Length(n) = framing {
            if n != 0 {
                return Err(format!("the answer's body is empty, its length says {n}"));
            }
        }
        if framing == Out::Chunked {
            out.extend_from_slice(b"0\r\n\r\n");
        }
        return write_out(link, out).await.map_err(|e| e.to_string());
    }
    let mut trailers = None;
    loop {
        // What is ready goes out with what came before; the write waits
        // until the body has nothing more at once (or a lot is gathered).
        let polled =
            std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
        let frame = match polled {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                write_out(link, out).await.map_err(|e| e.to_string())?;
                out.clear();
                body.frame().await
            }
        };
        let frame = match frame {
            None => break,
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Err(format!("the answer's body failed: {e}")),
        };
        let frame = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                trailers = frame.into_trailers().ok();
                continue;
            }
        };
        if frame.is_empty() {
            continue;
        }
        match &mut framing {
            Out::Length(left) => {
                let n = frame.len() as u64;
                if n > *left {
                    return Err("the answer's body is longer than its length".into());
                }
                *left -= n;
                out.extend_from_slice(&frame);
            }
            Out::Chunked => {
                chunk_line(out, frame.len());
                out.extend_from_slice(&frame);
                out.extend_from_slice(b"\r\n");
            }
            Out::Close => out.extend_from_slice(&frame),
            Out::None => {}
        }
        if out.len() >= WRITE_SIZE {
            write_out(link, out).await.map_err(|e| e.to_string())?;
            out.clear();
        }
        if body.is_end_stream() {
            break;
        }
    }
    match framing {
        Out::Length(0) | Out::None | Out::Close => {}
        Out::Length(left) => {
            return Err(format!(
                "the answer's body ended {left} bytes short of its length"
            ))
        }
        Out::Chunked => {
            out.extend_from_slice(b"0\r\n");
            if let (Some(trailers), true) = (trailers, meta.trailers) {
                for (name, value) in &trailers {
                    put_header(out, name, value);
                }
            }
            out.extend_from_slice(b"\r\n");
        }
    }
    write_out(link, out).await.map_err(|e| e.to_string())
}

/// A chunk-size line (hexadecimal, no extensions).
fn chunk_line(out: &mut Vec<u8>, len: usize) {
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut n = len;
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

fn status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `date: ...\r\n`, the text made once a second per thread.
fn put_date(out: &mut Vec<u8>) {
    thread_local! {
        static DATE_TEXT: std::cell::RefCell<(u64, [u8; 29])> =
            const { std::cell::RefCell::new((u64::MAX, [0; 29])) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE_TEXT.with_borrow_mut(|(at, text)| {
        if *at != secs {
            let made = httpdate::fmt_http_date(now);
            if made.len() == text.len() {
                text.copy_from_slice(made.as_bytes());
                *at = secs;
            }
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(text);
        out.extend_from_slice(b"\r\n");
    });
}

/// Writes `bytes` whole and flushes them (TLS holds records until then).
/// An interim `100 Continue` begun first is finished first.
async fn write_out<S: Io>(link: &Shared<S>, bytes: &[u8]) -> io::Result<()> {
    let mut at = 0;
    std::future::poll_fn(|cx| {
        let mut guard = link.lock();
        let l = &mut *guard;
        ready!(l.poll_settle_continue(cx))?;
        while at < bytes.len() {
            match ready!(Pin::new(&mut l.io).poll_write(cx, &bytes[at..]))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => at += n,
            }
        }
        Pin::new(&mut l.io).poll_flush(cx)
    })
    .await
}

/// Ends a connection the client has nothing more to send on: its write
/// side is shut (with TLS, close_notify) before it is dropped.
async fn shut<S: Io>(link: &Shared<S>) {
    let _ = std::future::poll_fn(|cx| Pin::new(&mut link.lock().io).poll_shutdown(cx)).await;
}

/// Whether the client closed its connection (or it failed) while its
/// request waits for an answer. Only once the request's body has been read:
/// what is read is kept (the next requests, pipelined), up to `max_head`.
fn client_gone<S: Io>(link: &Shared<S>, max_head: usize, cx: &mut Context<'_>) -> bool {
    let mut guard = link.lock();
    let l = &mut *guard;
    while l.body.is_done() && !l.broken && l.buf.len() < max_head {
        match poll_read(&mut l.io, &mut l.buf, cx) {
            Poll::Pending => return false,
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return true,
            Poll::Ready(Ok(_)) => {}
        }
    }
    false
}

/// Ends a connection whose client may still be sending: the write side is
/// shut, and what arrives is read and dropped until the client closes, or
/// for [`LINGER_TIME`] and [`LINGER_BYTES`] at most. Closing with unread
/// bytes would reset the connection, and the client could lose the answer.
async fn linger<S: Io>(link: &Shared<S>, timer: &ConnTimer) {
    let deadline = Instant::now() + LINGER_TIME;
    let mut dropped = 0usize;
    let mut shut = false;
    std::future::poll_fn(|cx| {
        let mut guard = link.lock();
        let l = &mut *guard;
        if !shut {
            match Pin::new(&mut l.io).poll_shutdown(cx) {
                Poll::Ready(Ok(())) => shut = true,
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                // (TLS: its close_notify waits for room to be sent.)
                Poll::Pending => return timer.poll_until(deadline, cx),
            }
        }
        loop {
            l.buf.clear();
            match poll_read(&mut l.io, &mut l.buf, cx) {
                Poll::Ready(Ok(n)) if n > 0 && dropped + n < LINGER_BYTES => dropped += n,
                Poll::Ready(_) => return Poll::Ready(()),
                Poll::Pending => return timer.poll_until(deadline, cx),
            }
        }
    })
    .await
}
