//! The ALB's HTTP/1.1 client for pooled upstream connections.
//!
//! A request is written and its answer read by the request's own task, on
//! the socket itself: no task per connection and no channel between the
//! request and its connection, which is what hyper's client costs (a wake
//! of the connection's task to send, another of the request's for the head
//! and one per body chunk). The answer's body reads the same socket as it
//! is polled, and hands the connection back once read to its end.
//!
//! What it speaks: requests with an empty, sized or chunked body (the
//! trailers that may go kept), the answer read while the body goes;
//! answers framed by `Content-Length`, chunked (with trailers) or by the
//! close, read strictly (RFC 9112 §6.3, §7.1), `1xx` interim answers
//! skipped, `HEAD`, `204` and `304` without a body. Upgrades (WebSocket)
//! stay on hyper's client, on a connection of their own.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::upstream::{BoxError, Outgoing, ProxyBody};

mod answer;
mod framing;
mod incoming;
mod request;
pub mod server;
#[cfg(test)]
mod server_tests;
#[cfg(test)]
mod tests;

use answer::{parse_head, Head};
pub use answer::{Answer, RawHead};
use framing::{Decoder, Kind};
pub use request::request_line;
use request::{encode_head, Framing, Sending};

/// Most header lines an answer (or a chunked body's trailers) may have,
/// as hyper's client allows.
const MAX_HEADERS: usize = 100;
/// Largest answer head: beyond it the endpoint is failed (502).
const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size line (with extensions) of a chunked body, and most
/// bytes of chunk extensions in one body (hyper's client allows as many).
const MAX_CHUNK_LINE: usize = 4096;
const MAX_EXTENSIONS: usize = 16 * 1024;
/// Room made for a read when less than `READ_MIN` is left.
const READ_SIZE: usize = 16 * 1024;
const READ_MIN: usize = 4 * 1024;
/// Request body bytes gathered before they are written.
const WRITE_SIZE: usize = 16 * 1024;

/// What an [`Error::Io`] was doing: writing the request.
const SENDING: &str = "sending the request";

/// A connection: TCP, or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Send + Sync + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin> Io for T {}

/// Where `part`, a slice of `buf`'s first `len` bytes (a head httparse
/// read), is in them; an empty part may point anywhere, and is put at 0.
fn place(buf: &[u8], len: usize, part: &[u8]) -> std::ops::Range<usize> {
    let start = (part.as_ptr() as usize)
        .checked_sub(buf.as_ptr() as usize)
        .filter(|&start| !part.is_empty() && start + part.len() <= len)
        .unwrap_or(0);
    start..start + part.len()
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
    pub unsent: Option<Outgoing>,
}

/// A failure after which the request cannot go again.
impl From<Error> for Failed {
    fn from(error: Error) -> Self {
        Failed {
            error,
            unsent: None,
        }
    }
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
    /// closed it, nor sent anything unasked (with TLS, also none already
    /// decrypted and held). Costs a read only when the socket was reported
    /// readable since its last answer.
    pub fn is_usable(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let before = self.buf.len();
        match poll_read(&mut *self.io, &mut self.buf, &mut cx) {
            // Nothing (with TLS, maybe a record with no data in it, such
            // as a session ticket).
            Poll::Pending => self.buf.len() == before,
            Poll::Ready(_) => false,
        }
    }

    /// Sends `req` (its URI in origin form) and reads the answer's head.
    /// The body reads on from the same connection; [`Answer::finish`]
    /// gives the connection back once the body has been read to its end.
    pub async fn send(mut self, outgoing: Outgoing) -> Result<Response<Answer>, Failed> {
        let head_only = outgoing.req.method() == Method::HEAD;
        let head = outgoing.head;
        let (parts, body) = outgoing.req.into_parts();
        let mut out = Vec::with_capacity(512);
        let framing = encode_head(&mut out, &parts, head.as_deref(), &body);
        if body.is_end_stream() {
            let unsent = (parts, body, head);
            return match self.write_whole(&out).await {
                Ok(()) => match self.read_head(head_only).await {
                    Ok((head, kind)) => Ok(self.answer(head, kind, true, None)),
                    Err(error) => Err(self.failed(error, unsent)),
                },
                Err(error) => Err(self.failed(error, unsent)),
            };
        }
        let mut sending = Sending {
            out,
            at: 0,
            body,
            framing,
            left: match framing {
                Framing::Length(n) => Some(n),
                Framing::Chunked | Framing::None => None,
            },
            trailers: None,
            ended: false,
        };
        let mut got_any = false;
        let sent =
            std::future::poll_fn(|cx| self.poll_send(cx, &mut sending, head_only, &mut got_any))
                .await;
        match sent {
            Ok(None) => match self.read_head(head_only).await {
                Ok((head, kind)) => Ok(self.answer(head, kind, true, None)),
                Err(error) => Err(error.into()),
            },
            // The final answer came before the body was all sent: the
            // body goes on as the answer is read (an origin that echoes
            // waits for it; one that answered early may read it or not).
            // What the origin made of it is unknown: the connection is not
            // reused.
            Ok(Some((head, kind))) => Ok(self.answer(head, kind, false, Some(Box::new(sending)))),
            // The origin may have answered early (413, say) and closed:
            // that answer says more than the write error.
            Err(error @ Error::Io(..)) => match self.read_head(head_only).await {
                Ok((head, kind)) => Ok(self.answer(head, kind, false, None)),
                Err(_) => Err(error.into()),
            },
            Err(error) => Err(error.into()),
        }
    }

    /// A request without a body that failed: it goes back to be sent on
    /// another connection when this one was reused and ended before any
    /// of the answer came (the origin had closed it while it waited), and
    /// its method is safe to repeat (RFC 9110 §9.2.2).
    fn failed(
        &self,
        error: Error,
        (parts, body, head): (http::request::Parts, ProxyBody, Option<Vec<u8>>),
    ) -> Failed {
        let stale = self.reused
            && match &error {
                Error::Closed => true,
                // A read that failed before a byte came is `Closed`; one
                // that failed later had part of an answer: not stale.
                Error::Io(doing, e) => {
                    *doing == SENDING
                        && matches!(
                            e.kind(),
                            io::ErrorKind::BrokenPipe
                                | io::ErrorKind::ConnectionReset
                                | io::ErrorKind::NotConnected
                                | io::ErrorKind::UnexpectedEof
                        )
                }
                _ => false,
            };
        let unsent = (stale && crate::proxy::idempotent(&parts.method)).then(|| Outgoing {
            req: Request::from_parts(parts, body),
            head,
        });
        Failed { error, unsent }
    }

    fn answer(
        self,
        head: Head,
        kind: Kind,
        reusable: bool,
        sending: Option<Box<Sending>>,
    ) -> Response<Answer> {
        let mut resp = Response::new(Answer {
            conn: Some(self),
            sending,
            body: Decoder::new(kind),
            keep_alive: reusable && head.keep_alive,
        });
        *resp.status_mut() = head.status;
        *resp.version_mut() = head.version;
        resp.extensions_mut().insert(head.raw);
        resp.body_mut().settle();
        resp
    }

    /// Writes the head and the body after it, and reads the answer's head
    /// as it comes meanwhile: an origin may answer before it has read the
    /// whole body (a `413`), or while it reads (an echo), and neither side
    /// must wait on the other. `Ok(None)` once the body is sent;
    /// `Ok(Some(..))` when the final answer's head came first.
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        s: &mut Sending,
        head_only: bool,
        got_any: &mut bool,
    ) -> Poll<Result<Option<(Head, Kind)>, Error>> {
        if let Poll::Ready(head) = self.poll_head(cx, head_only, got_any) {
            return Poll::Ready(head.map(Some));
        }
        s.poll_write(&mut *self.io, cx).map_ok(|()| None)
    }

    /// Writes a request that is all in `out`, and flushes it (TLS holds
    /// records until then).
    async fn write_whole(&mut self, out: &[u8]) -> Result<(), Error> {
        let written = match self.io.write_all(out).await {
            Ok(()) => self.io.flush().await,
            Err(e) => Err(e),
        };
        written.map_err(|e| Error::Io(SENDING, e))
    }

    /// Reads the final answer's head (interim `1xx` answers are skipped)
    /// and works out how its body is framed.
    async fn read_head(&mut self, head_only: bool) -> Result<(Head, Kind), Error> {
        let mut got_any = !self.buf.is_empty();
        std::future::poll_fn(|cx| self.poll_head(cx, head_only, &mut got_any)).await
    }

    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        head_only: bool,
        got_any: &mut bool,
    ) -> Poll<Result<(Head, Kind), Error>> {
        loop {
            if !self.buf.is_empty() {
                match parse_head(&self.buf) {
                    Err(e) => return Poll::Ready(Err(e)),
                    Ok(Some((len, head))) if head.status.is_informational() => {
                        if head.status == StatusCode::SWITCHING_PROTOCOLS {
                            return Poll::Ready(Err(Error::Answer(
                                "101 Switching Protocols to a request that asked for no upgrade"
                                    .into(),
                            )));
                        }
                        self.buf.advance(len);
                        continue;
                    }
                    Ok(Some((len, head))) => {
                        let bytes = self.buf.split_to(len).freeze();
                        return Poll::Ready(head.build(&bytes).and_then(|head| {
                            let kind = head.body_kind(head_only)?;
                            Ok((head, kind))
                        }));
                    }
                    Ok(None) if self.buf.len() >= MAX_HEAD => {
                        return Poll::Ready(Err(Error::Answer(format!(
                            "its head is longer than {MAX_HEAD} bytes"
                        ))))
                    }
                    Ok(None) => {}
                }
            }
            match poll_read(&mut *self.io, &mut self.buf, cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(if *got_any {
                        Error::Answer("the connection closed in the middle of its head".into())
                    } else {
                        Error::Closed
                    }))
                }
                Poll::Ready(Ok(_)) => *got_any = true,
                // Ended before a byte came: reset, or (TLS) closed without
                // saying so.
                Poll::Ready(Err(e))
                    if !*got_any
                        && matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
                        ) =>
                {
                    return Poll::Ready(Err(Error::Closed))
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Error::Io("reading the answer", e))),
            }
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
