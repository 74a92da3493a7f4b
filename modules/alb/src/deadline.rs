//! The first request's header deadline, with a 408.
//!
//! hyper closes an HTTP/1 connection whose headers are late without a word.
//! A client owed an answer gets one here: [`FirstRequest`] wraps the
//! connection, and if no request has arrived when the deadline passes, it
//! writes `408 Request Timeout` itself and ends the connection. No response
//! can be under way then (there was no request to answer), so the 408
//! cannot interleave with one. Once a request has arrived the deadline is
//! dropped; later HTTP/1 requests on the connection fall under hyper's own
//! header timeout. An HTTP/2 client (its preface) that opens no stream in
//! time is closed without a 408, which it would not understand.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

const RESPONSE: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 51\r\nconnection: close\r\n\r\nthe request headers did not arrive within the limit\n";
const H2_PREFACE_START: &[u8] = b"PRI * HTTP/2.0";

/// Set by the service when the first request arrives.
#[derive(Clone, Default)]
pub struct Arrived(Arc<AtomicBool>);

impl Arrived {
    pub fn mark(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

enum State {
    /// Waiting for the first request, until the deadline.
    Waiting(Pin<Box<Sleep>>),
    /// Writing the 408 (this many bytes written).
    Answering(usize),
    /// The 408 is out: the connection reads as ended.
    Done,
    /// The deadline no longer applies.
    Off,
}

/// A connection with a deadline on its first request's headers.
pub struct FirstRequest<S> {
    inner: S,
    arrived: Arrived,
    state: State,
    /// The first bytes, to recognize the HTTP/2 preface.
    first: [u8; 14],
    first_len: usize,
    /// The first bytes are not the HTTP/2 preface.
    http1: bool,
    /// The first bytes are the HTTP/2 preface.
    http2: bool,
    /// Fired: counted by the caller.
    pub on_timeout: Option<Box<dyn FnOnce() + Send>>,
    /// Bytes read before hyper took the connection (to tell HTTP/1 from
    /// HTTP/2), handed back before anything else is read; and how many of
    /// them have been.
    replay: Vec<u8>,
    replayed: usize,
}

impl<S> FirstRequest<S> {
    pub fn new(inner: S, deadline: Duration, arrived: Arrived) -> Self {
        FirstRequest {
            inner,
            arrived,
            state: State::Waiting(Box::pin(tokio::time::sleep(deadline))),
            first: [0; 14],
            first_len: 0,
            http1: false,
            http2: false,
            on_timeout: None,
            replay: Vec::new(),
            replayed: 0,
        }
    }

    /// Gives `bytes` (read from this stream) back: the next reads return
    /// them first. They were seen once already; the 408 logic does not see
    /// them again.
    pub fn unread(&mut self, bytes: Vec<u8>) {
        self.replay = bytes;
        self.replayed = 0;
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for FirstRequest<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.replayed < this.replay.len() && matches!(this.state, State::Waiting(_) | State::Off)
        {
            let rest = &this.replay[this.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            if this.replayed == this.replay.len() {
                this.replay = Vec::new();
                this.replayed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        loop {
            match &mut this.state {
                State::Off => return Pin::new(&mut this.inner).poll_read(cx, buf),
                State::Done => return Poll::Ready(Ok(())),
                State::Waiting(sleep) => {
                    if this.arrived.is_set() {
                        this.state = State::Off;
                        continue;
                    }
                    let before = buf.filled().len();
                    if let Poll::Ready(r) = Pin::new(&mut this.inner).poll_read(cx, buf) {
                        if !this.http1 {
                            // The HTTP/2 preface: hyper's HTTP/2 side takes over.
                            let got = &buf.filled()[before..];
                            let n = got.len().min(this.first.len() - this.first_len);
                            this.first[this.first_len..this.first_len + n]
                                .copy_from_slice(&got[..n]);
                            this.first_len += n;
                            let first = &this.first[..this.first_len];
                            if !H2_PREFACE_START.starts_with(first) {
                                this.http1 = true;
                            } else if first.len() == H2_PREFACE_START.len() {
                                // Decided: HTTP/2.
                                this.http2 = true;
                                this.http1 = true;
                            }
                        }
                        return Poll::Ready(r);
                    }
                    ready!(sleep.as_mut().poll(cx));
                    if this.arrived.is_set() {
                        this.state = State::Off;
                        continue;
                    }
                    if let Some(f) = this.on_timeout.take() {
                        f();
                    }
                    this.state = if this.http2 {
                        State::Done
                    } else {
                        State::Answering(0)
                    };
                }
                State::Answering(done) => {
                    while *done < RESPONSE.len() {
                        let n =
                            ready!(Pin::new(&mut this.inner).poll_write(cx, &RESPONSE[*done..]))?;
                        if n == 0 {
                            break;
                        }
                        *done += n;
                    }
                    let _ = ready!(Pin::new(&mut this.inner).poll_flush(cx));
                    let _ = ready!(Pin::new(&mut this.inner).poll_shutdown(cx));
                    this.state = State::Done;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FirstRequest<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if matches!(self.state, State::Answering(_) | State::Done) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the connection was answered 408",
            )));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if matches!(self.state, State::Answering(_) | State::Done) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the connection was answered 408",
            )));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_client_that_sends_no_headers_in_time_gets_a_408() {
        let (client, server) = tokio::io::duplex(4096);
        let fired = Arc::new(AtomicBool::new(false));
        let f = fired.clone();
        let mut s = FirstRequest::new(server, Duration::from_secs(10), Arrived::default());
        s.on_timeout = Some(Box::new(move || f.store(true, Ordering::SeqCst)));
        let (mut cr, mut cw) = tokio::io::split(client);
        cw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let server_side = tokio::spawn(async move {
            let mut buf = vec![0u8; 1024];
            let mut total = 0;
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    return total;
                }
                total += n;
            }
        });
        let mut got = Vec::new();
        cr.read_to_end(&mut got).await.unwrap();
        let text = String::from_utf8(got).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{text}"
        );
        assert!(text.ends_with("within the limit\n"), "{text}");
        assert_eq!(
            server_side.await.unwrap(),
            25,
            "the partial head was read, then the end"
        );
        assert!(fired.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn unread_bytes_come_back_first_then_the_stream() {
        let (client, server) = tokio::io::duplex(4096);
        let mut s = FirstRequest::new(server, Duration::from_secs(10), Arrived::default());
        let (_cr, mut cw) = tokio::io::split(client);
        cw.write_all(b"GET / HT").await.unwrap();
        let mut first = vec![0u8; 64];
        let n = s.read(&mut first).await.unwrap();
        first.truncate(n);
        s.unread(first);
        cw.write_all(b"TP/1.1\r\n").await.unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(s.read(&mut buf).await.unwrap(), 4);
        assert_eq!(&buf, b"GET ");
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"/ HT");
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"TP/1.1\r\n");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_arrived_turns_the_deadline_off() {
        let (client, server) = tokio::io::duplex(4096);
        let arrived = Arrived::default();
        let mut s = FirstRequest::new(server, Duration::from_secs(10), arrived.clone());
        let (_cr, mut cw) = tokio::io::split(client);
        cw.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(s.read(&mut buf).await.unwrap(), 18);
        arrived.mark();
        tokio::time::sleep(Duration::from_secs(60)).await;
        cw.write_all(b"more").await.unwrap();
        assert_eq!(s.read(&mut buf).await.unwrap(), 4);
        s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_http2_client_that_opens_no_stream_is_closed_without_a_408() {
        let (client, server) = tokio::io::duplex(4096);
        let mut s = FirstRequest::new(server, Duration::from_secs(10), Arrived::default());
        let (mut cr, mut cw) = tokio::io::split(client);
        cw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(s.read(&mut buf).await.unwrap(), 24);
        // Silence past the deadline: the connection reads as ended.
        assert_eq!(s.read(&mut buf).await.unwrap(), 0);
        drop(s);
        let mut got = Vec::new();
        cr.read_to_end(&mut got).await.unwrap();
        assert!(
            got.is_empty(),
            "no HTTP/1 answer to an HTTP/2 client: {got:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_http2_client_with_a_stream_keeps_its_connection() {
        let (client, server) = tokio::io::duplex(4096);
        let arrived = Arrived::default();
        let mut s = FirstRequest::new(server, Duration::from_secs(10), arrived.clone());
        let (_cr, mut cw) = tokio::io::split(client);
        cw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(s.read(&mut buf).await.unwrap(), 24);
        arrived.mark();
        tokio::time::sleep(Duration::from_secs(60)).await;
        cw.write_all(b"x").await.unwrap();
        assert_eq!(s.read(&mut buf).await.unwrap(), 1);
    }
}
