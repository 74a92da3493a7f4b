//! The ALB's HTTP/1.1 client for pooled upstream connections.
//!
//! A request is written and its answer read by the request's own task, on
//! the socket itself: no task per connection and no channel between the
//! request and its connection, which is what hyper's client costs (a wake
//! of the connection's task to send, another of the request's for the head
//! and one per body chunk). The answer's body reads the same socket as it
//! is polled, and hands the connection back once read to its end.
//!
//! What it speaks: requests with an empty, sized or chunked body (trailers
//! kept when chunked); answers framed by `Content-Length`, chunked (with
//! trailers) or by the close, `1xx` interim answers skipped, `HEAD`, `204`
//! and `304` without a body. Upgrades (WebSocket) stay on hyper's client,
//! on a connection of their own.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::upstream::{BoxError, ProxyBody};

/// Most header lines an answer (or a chunked body's trailers) may have,
/// as hyper's client allows.
const MAX_HEADERS: usize = 100;
/// Largest answer head: beyond it the endpoint is failed (502).
const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size line (with extensions) of a chunked body.
const MAX_CHUNK_LINE: usize = 4096;
/// Room made for a read when less than `READ_MIN` is left.
const READ_SIZE: usize = 16 * 1024;
const READ_MIN: usize = 4 * 1024;
/// Request body bytes gathered before they are written.
const WRITE_SIZE: usize = 16 * 1024;

/// A connection: TCP, or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Send + Sync + Unpin {
    fn tcp(&self) -> &TcpStream;
}

impl Io for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Io for tokio_rustls::client::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

/// An open HTTP/1.1 connection to an endpoint, between requests.
pub struct Conn {
    io: Box<dyn Io>,
    /// Read but not yet used (empty between requests).
    buf: BytesMut,
    /// Whether it has served a request (a reused connection may have been
    /// closed by the origin while it waited).
    reused: bool,
}

/// Why an exchange failed.
#[derive(Debug)]
pub enum Error {
    /// The connection ended before a byte of the answer came.
    Closed,
    /// The connection failed while the request was written or the answer
    /// read.
    Io(&'static str, io::Error),
    /// The request's own body failed (the client's doing, or its limit).
    RequestBody(BoxError),
    /// The request body was longer or shorter than its `Content-Length`.
    RequestLength,
    /// The answer broke HTTP/1.1.
    Answer(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Closed => f.write_str("the connection closed before an answer came"),
            Error::Io(doing, e) => write!(f, "{doing}: {e}"),
            Error::RequestBody(e) => write!(f, "the request body failed: {e}"),
            Error::RequestLength => {
                f.write_str("the request body's length differs from its Content-Length")
            }
            Error::Answer(why) => write!(f, "the answer is not valid HTTP/1.1: {why}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(_, e) => Some(e),
            Error::RequestBody(e) => Some(&**e),
            _ => None,
        }
    }
}

/// A failed exchange, with the request when it was not sent at all (so it
/// can go on another connection).
pub struct Failed {
    pub error: Error,
    pub unsent: Option<Request<ProxyBody>>,
}

impl Conn {
    pub fn new(io: Box<dyn Io>) -> Self {
        Conn {
            io,
            buf: BytesMut::new(),
            reused: false,
        }
    }

    pub fn reused(&self) -> bool {
        self.reused
    }

    /// Whether an idle connection can take a request: the origin has not
    /// closed it, nor sent anything unasked. Costs a read only when the
    /// socket was reported readable since its last answer.
    pub fn is_usable(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.io.tcp().poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Readable: the end, bytes unasked for, or (TLS) a record
            // with no data in it, such as a session ticket.
            Poll::Ready(Ok(())) => {
                let before = self.buf.len();
                match poll_read(&mut *self.io, &mut self.buf, &mut cx) {
                    Poll::Pending => self.buf.len() == before,
                    Poll::Ready(_) => false,
                }
            }
        }
    }

    /// Sends `req` (its URI in origin form) and reads the answer's head.
    /// The body reads on from the same connection; [`Answer::finish`]
    /// gives the connection back once the body has been read to its end.
    pub async fn send(mut self, req: Request<ProxyBody>) -> Result<Response<Answer>, Failed> {
        let head_only = req.method() == Method::HEAD;
        let (parts, body) = req.into_parts();
        let mut out = Vec::with_capacity(512);
        let framing = encode_head(&mut out, &parts, &body);
        if body.is_end_stream() {
            let mut r = self.write(&mut out).await;
            if r.is_ok() {
                r = self.flush().await;
            }
            return match r {
                Ok(()) => match self.read_head(head_only).await {
                    Ok((head, kind)) => Ok(self.answer(head, kind, true)),
                    Err(error) => Err(self.failed(error, parts, body)),
                },
                Err(error) => Err(self.failed(error, parts, body)),
            };
        }
        let mut written = self.write_body(out, body, framing).await;
        if written.is_ok() {
            written = self.flush().await;
        }
        match written {
            Ok(()) => match self.read_head(head_only).await {
                Ok((head, kind)) => Ok(self.answer(head, kind, true)),
                Err(error) => Err(Failed {
                    error,
                    unsent: None,
                }),
            },
            // The origin may have answered early (413, say) and closed:
            // that answer says more than the write error.
            Err(error @ Error::Io(..)) => match self.read_head(head_only).await {
                Ok((head, kind)) => Ok(self.answer(head, kind, false)),
                Err(_) => Err(Failed {
                    error,
                    unsent: None,
                }),
            },
            Err(error) => Err(Failed {
                error,
                unsent: None,
            }),
        }
    }

    /// A request without a body that failed: it goes back to be sent on
    /// another connection when this one was reused and ended before any
    /// of the answer came (the origin had closed it while it waited), and
    /// its method is safe to repeat (RFC 9110 §9.2.2).
    fn failed(&self, error: Error, parts: http::request::Parts, body: ProxyBody) -> Failed {
        let stale = self.reused
            && match &error {
                Error::Closed => true,
                Error::Io(_, e) => matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::NotConnected
                ),
                _ => false,
            };
        let unsent = (stale && crate::proxy::idempotent(&parts.method))
            .then(|| Request::from_parts(parts, body));
        Failed { error, unsent }
    }

    fn answer(self, head: Head, kind: Kind, reusable: bool) -> Response<Answer> {
        let mut resp = Response::new(Answer {
            conn: Some(self),
            kind,
            keep_alive: reusable && head.keep_alive,
        });
        *resp.status_mut() = head.status;
        *resp.version_mut() = head.version;
        *resp.headers_mut() = head.headers;
        resp.body_mut().settle();
        resp
    }

    /// Writes the head in `out` and the body after it, framed as
    /// `framing` says, gathering small frames into one write.
    async fn write_body(
        &mut self,
        mut out: Vec<u8>,
        mut body: ProxyBody,
        framing: Framing,
    ) -> Result<(), Error> {
        let mut left = match framing {
            Framing::Length(n) => Some(n),
            Framing::Chunked | Framing::None => None,
        };
        let mut trailers = None;
        enum Step {
            Frame(Option<Result<Frame<Bytes>, BoxError>>),
            Write,
        }
        loop {
            let step = std::future::poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
                Poll::Ready(frame) => Poll::Ready(Step::Frame(frame)),
                // Nothing more for now: what is gathered goes out first.
                Poll::Pending if !out.is_empty() => Poll::Ready(Step::Write),
                Poll::Pending => Poll::Pending,
            })
            .await;
            let frame = match step {
                Step::Write => {
                    self.write(&mut out).await?;
                    continue;
                }
                Step::Frame(None) => break,
                Step::Frame(Some(Err(e))) => return Err(Error::RequestBody(e)),
                Step::Frame(Some(Ok(frame))) => frame,
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    trailers = frame.into_trailers().ok();
                    continue;
                }
            };
            if data.is_empty() {
                continue;
            }
            if let Some(left) = &mut left {
                *left = left
                    .checked_sub(data.len() as u64)
                    .ok_or(Error::RequestLength)?;
            }
            if framing == Framing::Chunked {
                out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            }
            out.extend_from_slice(&data);
            if framing == Framing::Chunked {
                out.extend_from_slice(b"\r\n");
            }
            if out.len() >= WRITE_SIZE {
                self.write(&mut out).await?;
            }
        }
        if left.is_some_and(|n| n > 0) {
            return Err(Error::RequestLength);
        }
        if framing == Framing::Chunked {
            out.extend_from_slice(b"0\r\n");
            for (name, value) in trailers.iter().flatten() {
                put_header(&mut out, name, value);
            }
            out.extend_from_slice(b"\r\n");
        }
        self.write(&mut out).await
    }

    async fn write(&mut self, out: &mut Vec<u8>) -> Result<(), Error> {
        let r = self.io.write_all(out).await;
        out.clear();
        r.map_err(|e| Error::Io("sending the request", e))
    }

    async fn flush(&mut self) -> Result<(), Error> {
        self.io
            .flush()
            .await
            .map_err(|e| Error::Io("sending the request", e))
    }

    /// Reads the final answer's head (interim `1xx` answers are skipped)
    /// and works out how its body is framed.
    async fn read_head(&mut self, head_only: bool) -> Result<(Head, Kind), Error> {
        let mut got_any = !self.buf.is_empty();
        loop {
            if !self.buf.is_empty() {
                if let Some((len, head)) = parse_head(&self.buf)? {
                    if head.status.is_informational() {
                        if head.status == StatusCode::SWITCHING_PROTOCOLS {
                            return Err(Error::Answer(
                                "101 Switching Protocols to a request that asked for no upgrade"
                                    .into(),
                            ));
                        }
                        self.buf.advance(len);
                        continue;
                    }
                    let bytes = self.buf.split_to(len).freeze();
                    let head = head.build(&bytes)?;
                    let kind = head.body_kind(head_only)?;
                    return Ok((head, kind));
                }
                if self.buf.len() >= MAX_HEAD {
                    return Err(Error::Answer(format!(
                        "its head is longer than {MAX_HEAD} bytes"
                    )));
                }
            }
            let n = match std::future::poll_fn(|cx| poll_read(&mut *self.io, &mut self.buf, cx))
                .await
            {
                Ok(n) => n,
                Err(e) if !got_any && e.kind() == io::ErrorKind::ConnectionReset => 0,
                Err(e) => return Err(Error::Io("reading the answer", e)),
            };
            if n == 0 {
                return Err(if got_any {
                    Error::Answer("the connection closed in the middle of its head".into())
                } else {
                    Error::Closed
                });
            }
            got_any = true;
        }
    }
}

/// Reads into `buf`'s spare room, making room first when little is left.
fn poll_read(io: &mut dyn Io, buf: &mut BytesMut, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < READ_MIN {
        buf.reserve(READ_SIZE);
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// How the request's body is framed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// Writes the request line and headers. `Content-Length` and
/// `Transfer-Encoding` are the ALB's to set: the body it sends is the
/// one it has, whatever the client's framing was.
fn encode_head(out: &mut Vec<u8>, parts: &http::request::Parts, body: &ProxyBody) -> Framing {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        if name != CONTENT_LENGTH && name != TRANSFER_ENCODING {
            put_header(out, name, value);
        }
    }
    let framing = if body.is_end_stream() {
        // A method that carries a body says it is empty.
        if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        Framing::None
    } else if let Some(n) = body.size_hint().exact() {
        out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
        Framing::Length(n)
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked
    };
    out.extend_from_slice(b"\r\n");
    framing
}

fn put_header(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// An answer's head as parsed, before its header values are copied out.
struct Parsed {
    status: StatusCode,
    version: Version,
    /// Each header's name, and its value's place in the head.
    headers: Vec<(HeaderName, std::ops::Range<usize>)>,
}

/// A final answer's head.
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    keep_alive: bool,
}

/// Parses an answer's head from the start of `buf`: its length and the
/// head, or `None` if more is needed.
fn parse_head(buf: &[u8]) -> Result<Option<(usize, Parsed)>, Error> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Error::Answer(format!(
                "it has more than {MAX_HEADERS} headers"
            )))
        }
        Err(e) => return Err(Error::Answer(e.to_string())),
    };
    let status = StatusCode::from_u16(resp.code.unwrap_or_default())
        .map_err(|_| Error::Answer(format!("status {:?}", resp.code)))?;
    let version = match resp.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let base = buf.as_ptr() as usize;
    let mut headers = Vec::with_capacity(resp.headers.len());
    for h in resp.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| Error::Answer(format!("header name {:?}", h.name)))?;
        let start = h.value.as_ptr() as usize - base;
        headers.push((name, start..start + h.value.len()));
    }
    Ok(Some((
        len,
        Parsed {
            status,
            version,
            headers,
        },
    )))
}

impl Parsed {
    /// The head with its values taken from `bytes` (the head's own bytes,
    /// shared, not copied).
    fn build(self, bytes: &Bytes) -> Result<Head, Error> {
        let mut headers = HeaderMap::with_capacity(self.headers.len());
        let mut close = false;
        let mut keep_alive_asked = false;
        for (name, range) in self.headers {
            let value = HeaderValue::from_maybe_shared(bytes.slice(range))
                .map_err(|_| Error::Answer(format!("the value of header {name}")))?;
            if name == CONNECTION {
                for token in value.as_bytes().split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    close |= token.eq_ignore_ascii_case(b"close");
                    keep_alive_asked |= token.eq_ignore_ascii_case(b"keep-alive");
                }
            }
            headers.append(name, value);
        }
        let keep_alive = !close && (self.version == Version::HTTP_11 || keep_alive_asked);
        Ok(Head {
            status: self.status,
            version: self.version,
            headers,
            keep_alive,
        })
    }
}

impl Head {
    /// How the body is framed (RFC 9112 §6.3).
    fn body_kind(&self, head_only: bool) -> Result<Kind, Error> {
        if head_only
            || self.status == StatusCode::NO_CONTENT
            || self.status == StatusCode::NOT_MODIFIED
        {
            return Ok(Kind::Length(0));
        }
        let mut te = self.headers.get_all(TRANSFER_ENCODING).iter().peekable();
        if te.peek().is_some() {
            let last = te
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .last();
            return Ok(if last.is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
                Kind::Chunked(Chunk::Size)
            } else {
                // Not chunked last: the body runs to the close.
                Kind::Close
            });
        }
        let mut length = None;
        for value in self.headers.get_all(CONTENT_LENGTH) {
            for part in value.as_bytes().split(|&b| b == b',') {
                let n = std::str::from_utf8(part.trim_ascii())
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| Error::Answer(format!("Content-Length {value:?}")))?;
                if length.is_some_and(|l| l != n) {
                    return Err(Error::Answer("two different Content-Length values".into()));
                }
                length = Some(n);
            }
        }
        Ok(length.map_or(Kind::Close, Kind::Length))
    }
}

/// How much of the body is left, by its framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Bytes left of a sized body.
    Length(u64),
    Chunked(Chunk),
    /// Until the origin closes.
    Close,
    /// Read to its end.
    Done,
}

/// Where a chunked body's reading is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// At a chunk-size line.
    Size,
    /// In a chunk's data, this much left.
    Data(u64),
    /// At the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: the trailers and the final CRLF.
    Trailers,
}

/// An upstream answer's body, read from its connection as it is polled.
pub struct Answer {
    /// Until the body has been read to its end.
    conn: Option<Conn>,
    kind: Kind,
    keep_alive: bool,
}

impl Answer {
    /// The connection, once the body has been read to its end, when it can
    /// serve another request.
    pub fn finish(&mut self) -> Option<Conn> {
        if self.kind != Kind::Done || !self.keep_alive {
            return None;
        }
        let mut conn = self.conn.take()?;
        // Bytes beyond the answer were not asked for.
        if !conn.buf.is_empty() {
            return None;
        }
        conn.reused = true;
        Some(conn)
    }

    /// Marks an empty body done at once.
    fn settle(&mut self) {
        if self.kind == Kind::Length(0) {
            self.kind = Kind::Done;
        }
    }

    /// The next frame from what has been read, if it makes one.
    fn next_buffered(&mut self) -> Result<Option<Frame<Bytes>>, Error> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        let buf = &mut conn.buf;
        loop {
            match self.kind {
                Kind::Done => return Ok(None),
                Kind::Length(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = (buf.len() as u64).min(left) as usize;
                    let left = left - n as u64;
                    self.kind = if left == 0 {
                        Kind::Done
                    } else {
                        Kind::Length(left)
                    };
                    return Ok(Some(Frame::data(buf.split_to(n).freeze())));
                }
                Kind::Close => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(Frame::data(buf.split().freeze())));
                }
                Kind::Chunked(Chunk::Size) => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((len, size))) => {
                        buf.advance(len);
                        self.kind = Kind::Chunked(if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        });
                    }
                    Ok(httparse::Status::Partial) if buf.len() < MAX_CHUNK_LINE => return Ok(None),
                    _ => return Err(Error::Answer("a chunk-size line".into())),
                },
                Kind::Chunked(Chunk::Data(left)) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = (buf.len() as u64).min(left) as usize;
                    let left = left - n as u64;
                    self.kind = Kind::Chunked(if left == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left)
                    });
                    return Ok(Some(Frame::data(buf.split_to(n).freeze())));
                }
                Kind::Chunked(Chunk::DataEnd) => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Error::Answer("a chunk not ended by CRLF".into()));
                    }
                    buf.advance(2);
                    self.kind = Kind::Chunked(Chunk::Size);
                }
                Kind::Chunked(Chunk::Trailers) => {
                    let mut slots = [httparse::EMPTY_HEADER; 16];
                    let parsed = match httparse::parse_headers(buf, &mut slots) {
                        Ok(httparse::Status::Complete((len, fields))) => Some((len, fields)),
                        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => None,
                        _ => return Err(Error::Answer("the trailers of a chunked body".into())),
                    };
                    let Some((len, fields)) = parsed else {
                        return Ok(None);
                    };
                    let mut trailers = HeaderMap::new();
                    for field in fields {
                        if let (Ok(name), Ok(value)) = (
                            HeaderName::from_bytes(field.name.as_bytes()),
                            HeaderValue::from_bytes(field.value),
                        ) {
                            trailers.append(name, value);
                        }
                    }
                    buf.advance(len);
                    self.kind = Kind::Done;
                    if !trailers.is_empty() {
                        return Ok(Some(Frame::trailers(trailers)));
                    }
                    return Ok(None);
                }
            }
        }
    }
}

impl Body for Answer {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        loop {
            match this.next_buffered() {
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                Err(e) => {
                    this.fail();
                    return Poll::Ready(Some(Err(e)));
                }
                Ok(None) if this.kind == Kind::Done => return Poll::Ready(None),
                Ok(None) => {}
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match poll_read(&mut *conn.io, &mut conn.buf, cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) if this.kind == Kind::Close => {
                    this.kind = Kind::Done;
                    this.keep_alive = false;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => {
                    this.fail();
                    return Poll::Ready(Some(Err(Error::Answer(
                        "the connection closed in the middle of its body".into(),
                    ))));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    this.fail();
                    return Poll::Ready(Some(Err(Error::Io("reading the answer", e))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.kind == Kind::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.kind {
            Kind::Length(n) => SizeHint::with_exact(n),
            Kind::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

impl Answer {
    /// After a failure the connection cannot be reused.
    fn fail(&mut self) {
        self.conn = None;
        self.keep_alive = false;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::{BodyExt, Empty, Full, StreamBody};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;

    /// An origin that takes one connection and, for each answer in turn,
    /// reads a request (its head, and `body` bytes after it) and writes
    /// the answer; what it read of each request is sent back on the
    /// channel. After the last answer it closes.
    async fn origin(
        exchanges: Vec<(usize, &'static [u8])>,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            for (body, answer) in exchanges {
                let head_end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    let mut chunk = [0u8; 4096];
                    let n = tcp.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                };
                while buf.len() < head_end + body {
                    let mut chunk = [0u8; 4096];
                    let n = tcp.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let end = (head_end + body).min(buf.len());
                let _ = tx.send(buf.drain(..end).collect());
                tcp.write_all(answer).await.unwrap();
            }
        });
        (addr, rx)
    }

    async fn conn(addr: std::net::SocketAddr) -> Conn {
        Conn::new(Box::new(TcpStream::connect(addr).await.unwrap()))
    }

    fn request(method: Method, body: ProxyBody) -> Request<ProxyBody> {
        Request::builder()
            .method(method)
            .uri("/path?q=1")
            .header("host", "origin.test")
            .header("x-one", "1")
            .body(body)
            .unwrap()
    }

    fn empty() -> ProxyBody {
        Empty::<Bytes>::new().map_err(|e| match e {}).boxed()
    }

    /// Reads the whole body: its data, its trailers, and the connection
    /// if it can be reused.
    async fn read_all(resp: Response<Answer>) -> (Vec<u8>, Option<HeaderMap>, Option<Conn>) {
        let mut body = resp.into_body();
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap();
            match frame.into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(f) => trailers = f.into_trailers().ok(),
            }
        }
        assert!(body.is_end_stream());
        (data, trailers, body.finish())
    }

    fn fails(r: Result<Response<Answer>, Failed>) -> Failed {
        match r {
            Ok(resp) => panic!("got an answer: {}", resp.status()),
            Err(f) => f,
        }
    }

    #[tokio::test]
    async fn a_sized_answer_is_read_and_its_connection_reused() {
        let (addr, mut seen) = origin(vec![
            (
                0,
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: b\r\n\r\nhello",
            ),
            (0, b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"),
        ])
        .await;
        let c = conn(addr).await;
        let resp = c.send(request(Method::GET, empty())).await.ok().unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-a"], "b");
        let (data, trailers, c) = read_all(resp).await;
        assert_eq!(data, b"hello");
        assert!(trailers.is_none());
        let c = c.expect("the connection comes back");
        assert!(c.reused());
        let head = String::from_utf8(seen.recv().await.unwrap()).unwrap();
        assert_eq!(
            head,
            "GET /path?q=1 HTTP/1.1\r\nhost: origin.test\r\nx-one: 1\r\n\r\n"
        );
        let resp = c.send(request(Method::GET, empty())).await.ok().unwrap();
        assert_eq!(resp.status(), 404);
        // An empty body is over as soon as the head is in.
        assert!(resp.body().is_end_stream());
        let (data, _, c) = read_all(resp).await;
        assert!(data.is_empty());
        assert!(c.is_some());
    }

    #[tokio::test]
    async fn a_chunked_answer_is_decoded_with_its_trailers() {
        let (addr, _seen) = origin(vec![(
            0,
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
              5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\ngrpc-status: 0\r\n\r\n",
        )])
        .await;
        let resp = conn(addr)
            .await
            .send(request(Method::GET, empty()))
            .await
            .ok()
            .unwrap();
        let (data, trailers, c) = read_all(resp).await;
        assert_eq!(data, b"hello!");
        assert_eq!(trailers.unwrap()["grpc-status"], "0");
        assert!(
            c.is_some(),
            "a chunked answer read to its end leaves the connection usable"
        );
    }

    #[tokio::test]
    async fn head_204_and_304_answers_have_no_body_whatever_their_length_says() {
        let (addr, _seen) = origin(vec![
            (0, b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n"),
            (0, b"HTTP/1.1 204 No Content\r\n\r\n"),
            (0, b"HTTP/1.1 304 Not Modified\r\ncontent-length: 7\r\n\r\n"),
            (0, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
        ])
        .await;
        let mut c = conn(addr).await;
        for (method, status, body) in [
            (Method::HEAD, 200, &b""[..]),
            (Method::GET, 204, b""),
            (Method::GET, 304, b""),
            (Method::GET, 200, b"ok"),
        ] {
            let resp = c.send(request(method, empty())).await.ok().unwrap();
            assert_eq!(resp.status(), status);
            let (data, _, next) = read_all(resp).await;
            assert_eq!(data, body);
            c = next.expect("reusable");
        }
    }

    #[tokio::test]
    async fn an_answer_without_a_length_runs_to_the_close_and_is_not_reused() {
        let (addr, _seen) = origin(vec![(0, b"HTTP/1.1 200 OK\r\n\r\nall of it")]).await;
        let resp = conn(addr)
            .await
            .send(request(Method::GET, empty()))
            .await
            .ok()
            .unwrap();
        let (data, _, c) = read_all(resp).await;
        assert_eq!(data, b"all of it");
        assert!(c.is_none());
    }

    #[tokio::test]
    async fn interim_answers_are_skipped() {
        let (addr, _seen) = origin(vec![(
            0,
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
              HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n",
        )])
        .await;
        let resp = conn(addr)
            .await
            .send(request(Method::GET, empty()))
            .await
            .ok()
            .unwrap();
        assert_eq!(resp.status(), 201);
        assert!(resp.headers().get("link").is_none());
    }

    #[tokio::test]
    async fn broken_answers_are_errors_that_say_what_is_wrong() {
        let too_many = format!(
            "HTTP/1.1 200 OK\r\n{}\r\n",
            "x-h: 1\r\n".repeat(MAX_HEADERS + 1)
        );
        let too_long = format!("HTTP/1.1 200 OK\r\nx-h: {}", "a".repeat(MAX_HEAD));
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                b"HTTP/1.1 2x0 OK\r\n\r\n".to_vec(),
                "invalid response status",
            ),
            (too_many.into_bytes(), "more than 100 headers"),
            (too_long.into_bytes(), "longer than 65536 bytes"),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok".to_vec(),
                "two different Content-Length",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n".to_vec(),
                "Content-Length",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-le".to_vec(),
                "in the middle of its head",
            ),
            (
                b"HTTP/1.1 101 Switching Protocols\r\n\r\n".to_vec(),
                "asked for no upgrade",
            ),
        ];
        for (answer, says) in cases {
            let answer: &'static [u8] = Box::leak(answer.into_boxed_slice());
            let (addr, _seen) = origin(vec![(0, answer)]).await;
            let failed = fails(conn(addr).await.send(request(Method::GET, empty())).await);
            assert!(failed.unsent.is_none());
            let text = failed.error.to_string();
            assert!(text.contains(says), "{text:?} should say {says:?}");
        }
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_and_the_connection_is_dropped() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        ] {
            let (addr, _seen) = origin(vec![(0, answer)]).await;
            let resp = conn(addr)
                .await
                .send(request(Method::GET, empty()))
                .await
                .ok()
                .unwrap();
            let mut body = resp.into_body();
            let err = loop {
                match body.frame().await {
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => break e,
                    None => panic!("the body ended without an error"),
                }
            };
            assert!(
                err.to_string().contains("body") || err.to_string().contains("chunk"),
                "{err}"
            );
            assert!(body.finish().is_none());
        }
    }

    #[tokio::test]
    async fn a_sized_request_body_is_sent_with_its_length() {
        let (addr, mut seen) =
            origin(vec![(11, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")]).await;
        let body = Full::new(Bytes::from_static(b"hello world"))
            .map_err(|e| match e {})
            .boxed();
        let mut req = request(Method::POST, body);
        // The client's own framing is not passed on: the ALB frames what it
        // sends.
        req.headers_mut()
            .insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        let resp = conn(addr).await.send(req).await.ok().unwrap();
        assert_eq!(resp.status(), 200);
        let got = String::from_utf8(seen.recv().await.unwrap()).unwrap();
        assert_eq!(
            got,
            "POST /path?q=1 HTTP/1.1\r\nhost: origin.test\r\nx-one: 1\r\n\
             content-length: 11\r\n\r\nhello world"
        );
    }

    #[tokio::test]
    async fn a_request_body_of_unknown_length_is_chunked_with_its_trailers() {
        let sent = b"POST /path?q=1 HTTP/1.1\r\nhost: origin.test\r\nx-one: 1\r\n\
                     transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nx-sum: 5\r\n\r\n";
        let body_len = sent.len() - sent.windows(4).position(|w| w == b"\r\n\r\n").unwrap() - 4;
        let (addr, mut seen) = origin(vec![(
            body_len,
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        )])
        .await;
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", HeaderValue::from_static("5"));
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::data(Bytes::new())),
            Ok(Frame::data(Bytes::from_static(b"de"))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = StreamBody::new(futures::stream::iter(frames)).boxed();
        let resp = conn(addr)
            .await
            .send(request(Method::POST, body))
            .await
            .ok()
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(seen.recv().await.unwrap(), sent.to_vec());
    }

    #[tokio::test]
    async fn an_empty_post_says_its_length_is_zero() {
        let (addr, mut seen) =
            origin(vec![(0, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")]).await;
        conn(addr)
            .await
            .send(request(Method::POST, empty()))
            .await
            .ok()
            .unwrap();
        let got = String::from_utf8(seen.recv().await.unwrap()).unwrap();
        assert!(got.ends_with("content-length: 0\r\n\r\n"), "{got}");
    }

    #[tokio::test]
    async fn a_failing_request_body_is_reported_as_the_request_bodys_failure() {
        let (addr, _seen) = origin(vec![(0, b"HTTP/1.1 200 OK\r\n\r\n")]).await;
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"abc"))),
            Err("the client went away".into()),
        ];
        let body = StreamBody::new(futures::stream::iter(frames)).boxed();
        let failed = fails(conn(addr).await.send(request(Method::POST, body)).await);
        assert!(matches!(failed.error, Error::RequestBody(_)));
        use std::error::Error as _;
        assert_eq!(
            failed.error.source().unwrap().to_string(),
            "the client went away"
        );
    }

    #[tokio::test]
    async fn an_early_answer_is_returned_when_the_origin_stops_reading_the_body() {
        // Answers 413 after the head and closes without reading the body.
        // 64 MiB: more than the sockets hold, so the write fails (the
        // origin resets) before the whole body is out.
        let (addr, _seen) = origin(vec![(
            0,
            b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\nconnection: close\r\n\r\nbig",
        )])
        .await;
        let big = Bytes::from(vec![b'x'; 64 << 20]);
        let body = Full::new(big).map_err(|e| match e {}).boxed();
        let resp = conn(addr).await.send(request(Method::PUT, body)).await;
        let resp = match resp {
            Ok(resp) => resp,
            Err(f) => panic!("the early answer was lost: {}", f.error),
        };
        assert_eq!(resp.status(), 413);
        let (data, _, c) = read_all(resp).await;
        assert_eq!(data, b"big");
        assert!(
            c.is_none(),
            "an answer to a request not sent whole ends its connection"
        );
    }

    #[tokio::test]
    async fn a_reused_connection_the_origin_closed_gives_back_a_get_not_a_post() {
        for (method, given_back) in [(Method::GET, true), (Method::POST, false)] {
            let (addr, _seen) =
                origin(vec![(0, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")]).await;
            let resp = conn(addr)
                .await
                .send(request(Method::GET, empty()))
                .await
                .ok()
                .unwrap();
            let (_, _, c) = read_all(resp).await;
            let mut c = c.unwrap();
            // The origin closes after its one answer.
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(
                !c.is_usable(),
                "a connection the origin closed is not usable"
            );
            let failed = fails(c.send(request(method.clone(), empty())).await);
            assert_eq!(
                failed.unsent.is_some(),
                given_back,
                "{method}: {}",
                failed.error
            );
        }
    }

    #[tokio::test]
    async fn an_idle_connection_is_usable_until_something_arrives() {
        let (addr, _seen) = origin(vec![(
            0,
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n",
        )])
        .await;
        let mut c = conn(addr).await;
        assert!(c.is_usable());
        let resp = c.send(request(Method::GET, empty())).await.ok().unwrap();
        // Bytes beyond the answer: the connection is not given back.
        let (data, _, c) = read_all(resp).await;
        assert_eq!(data, b"ok");
        assert!(c.is_none());
    }
}
