//! A client connection as the server and the request being served share
//! it: the server writes answers on it, and the request's body reads from
//! it (writing `100 Continue` first when the client asked for it). HTTP/1
//! serves one request at a time, and mostly on one task; the body may be
//! polled from another (hyper's HTTP/2 client sends it from a task of its
//! own), so the lock is held only for one poll at a time.

use std::sync::Arc;
use std::task::ready;

use parking_lot::Mutex;

use super::framing::{Decoder, Kind};
use super::*;

/// The interim answer a client that sent `Expect: 100-continue` waits for.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The client's connection and what has been read from it.
pub(super) struct Link<S> {
    pub(super) io: S,
    /// Read and not yet used: the rest of a request head, the body, or
    /// requests sent ahead (pipelined).
    pub(super) buf: BytesMut,
    /// The body of the request being served (`Done` when it has none).
    pub(super) body: Decoder,
    /// Whether the client waits for `100 Continue`, and how much of it
    /// has been written.
    pub(super) expect: Continue,
    /// The body broke HTTP/1.1, the connection ended in it, or the request
    /// was answered and its body given up: the body reads no more, and the
    /// connection cannot serve another request.
    pub(super) broken: bool,
}

/// `Expect: 100-continue` (RFC 9110 §10.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Continue {
    /// Not asked for, sent, or no longer owed (the answer has begun, or
    /// the body came anyway).
    No,
    /// Owed before the body's first read.
    Owed,
    /// This much of it written.
    Writing(usize),
}

pub(super) type Shared<S> = Arc<Mutex<Link<S>>>;

impl<S: Io> Link<S> {
    /// Writes what is left of a `100 Continue` that was begun, so that an
    /// answer never lands in the middle of it; one not begun is dropped.
    pub(super) fn poll_settle_continue(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Continue::Writing(at) = self.expect {
            if at == CONTINUE.len() {
                ready!(Pin::new(&mut self.io).poll_flush(cx))?;
                break;
            }
            match ready!(Pin::new(&mut self.io).poll_write(cx, &CONTINUE[at..]))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => self.expect = Continue::Writing(at + n),
            }
        }
        self.expect = Continue::No;
        Poll::Ready(Ok(()))
    }

    /// Gives up the request's body: whoever still holds it gets an error
    /// from it, not the bytes that follow on the connection.
    pub(super) fn abandon(&mut self) {
        if !self.body.is_done() {
            self.broken = true;
        }
    }

    /// Skips the rest of the request body as far as it has been read:
    /// whether the body is now done (the connection can serve another
    /// request without reading more).
    pub(super) fn skip_buffered_body(&mut self) -> bool {
        while !self.broken && !self.body.is_done() {
            match self.body.next(&mut self.buf) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => self.broken = true,
            }
        }
        !self.broken && self.body.is_done()
    }
}

/// Why a request body could not be read.
#[derive(Debug)]
pub enum BodyError {
    /// The body broke HTTP/1.1 (its chunked coding).
    Framing(String),
    /// The client closed the connection before the body's end.
    Closed,
    Io(io::Error),
    /// Polled again after it failed, or after the request was answered
    /// without it.
    Abandoned,
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Framing(why) => write!(f, "the request body is not valid HTTP/1.1: {why}"),
            BodyError::Closed => {
                f.write_str("the client closed the connection in the middle of the request body")
            }
            BodyError::Io(e) => write!(f, "reading the request body: {e}"),
            BodyError::Abandoned => f.write_str("the request body is no longer being read"),
        }
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BodyError::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// A request's body, read from the client's connection as it is polled.
pub(super) struct RequestBody<S> {
    pub(super) link: Shared<S>,
}

impl<S: Io> Body for RequestBody<S> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut guard = self.link.lock();
        let link = &mut *guard;
        loop {
            // Never an end: a body cut short must not pass for a whole one.
            if link.broken {
                return Poll::Ready(Some(Err(BodyError::Abandoned)));
            }
            match link.body.next(&mut link.buf) {
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(None) if link.body.is_done() => return Poll::Ready(None),
                Ok(None) => {}
                Err(why) => {
                    link.broken = true;
                    return Poll::Ready(Some(Err(BodyError::Framing(why))));
                }
            }
            // More is needed: the client that waits for `100 Continue` is
            // told to send it (unless it sent some already).
            if link.expect == Continue::Owed {
                link.expect = if link.buf.is_empty() {
                    Continue::Writing(0)
                } else {
                    Continue::No
                };
            }
            if let Err(e) = ready!(link.poll_settle_continue(cx)) {
                link.broken = true;
                return Poll::Ready(Some(Err(BodyError::Io(e))));
            }
            match ready!(poll_read(&mut link.io, &mut link.buf, cx)) {
                Ok(0) => {
                    link.broken = true;
                    return Poll::Ready(Some(Err(BodyError::Closed)));
                }
                Ok(_) => {}
                Err(e) => {
                    link.broken = true;
                    return Poll::Ready(Some(Err(BodyError::Io(e))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let link = self.link.lock();
        !link.broken && link.body.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.link.lock().body.kind {
            Kind::Length(n) => SizeHint::with_exact(n),
            Kind::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// A connection handed over after `101 Switching Protocols`: the bytes the
/// client sent after its request's head first, then the connection.
pub struct Upgraded {
    io: Box<dyn Io>,
    read: BytesMut,
}

impl Upgraded {
    pub(super) fn new(io: Box<dyn Io>, read: BytesMut) -> Self {
        Upgraded { io, read }
    }
}

impl AsyncRead for Upgraded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// In an upgrade request's extensions: the connection once the server has
/// written the `101` answer; `None` when the answer is another. (Clones
/// share it, as request extensions must be clonable; one of them gets it.)
#[derive(Clone)]
pub struct OnUpgrade(Arc<Mutex<Option<tokio::sync::oneshot::Receiver<Upgraded>>>>);

impl OnUpgrade {
    pub(super) fn new(rx: tokio::sync::oneshot::Receiver<Upgraded>) -> Self {
        OnUpgrade(Arc::new(Mutex::new(Some(rx))))
    }
}

impl std::future::Future for OnUpgrade {
    type Output = Option<Upgraded>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut rx = self.0.lock();
        let Some(pending) = rx.as_mut() else {
            return Poll::Ready(None);
        };
        let got = ready!(Pin::new(pending).poll(cx)).ok();
        *rx = None;
        Poll::Ready(got)
    }
}
