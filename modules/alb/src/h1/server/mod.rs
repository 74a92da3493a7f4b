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
use super::request::put_header;
use super::RawHead;
use super::*;
use crate::conn_timer::ConnTimer;
use crate::headers::put_line;
use std::task::ready;

mod head;
mod respond;

use head::{parse, too_large, Refusal};
use respond::respond;

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
    /// The connection's end is said in it before it closes (TLS's
    /// close_notify); a plain TCP socket's close sends its FIN itself.
    pub close_notify: bool,
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
                shut(&link, settings.close_notify).await;
                return;
            }
            // An idle kept-alive connection ends without a word.
            Waited::Late { any: false } if !first => return,
            Waited::Late { .. } => {
                refuse(&link, service, Refusal::late(), &mut out, timer).await;
                return;
            }
            Waited::Refused(refusal) => {
                refuse(&link, service, refusal, &mut out, timer).await;
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
        meta.keep_alive &= !probe.is_closing();
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
                shut(&link, settings.close_notify).await;
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

/// Answers a request the server refuses itself (counted), and ends the
/// connection.
async fn refuse<S: Io, Svc: Service>(
    link: &Shared<S>,
    service: &Svc,
    refusal: Refusal,
    out: &mut Vec<u8>,
    timer: &ConnTimer,
) {
    service.refused(refusal.reason);
    out.clear();
    refusal.encode(out);
    if write_out(link, out).await.is_ok() {
        linger(link, timer).await;
    }
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
/// side is shut (with TLS, after close_notify) before it is dropped. A
/// plain socket that the server alone holds is not: dropping it closes it,
/// which sends the same FIN, and a `shutdown` first would only cost a
/// system call. (A socket also held elsewhere, by an HTTP/2 upstream's
/// task still sending the request's body, is shut now, not when that
/// lets go.)
async fn shut<S: Io>(link: &Shared<S>, close_notify: bool) {
    if !close_notify && Arc::strong_count(link) == 1 {
        return;
    }
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
