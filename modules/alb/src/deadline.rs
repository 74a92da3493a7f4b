//! The first stream's deadline on an HTTP/2 connection.
//!
//! An HTTP/2 client (its preface read) that opens no stream within
//! `header_read_timeout_ms` is closed: [`FirstStream`] wraps the connection,
//! and once the deadline passes with no stream arrived, the connection reads
//! as ended, which ends hyper's HTTP/2 connection. No `408`: an HTTP/2
//! client would not understand one. HTTP/1's deadlines, with their `408`,
//! are the ALB's own server's (`h1::server`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Set by the service when the first stream arrives.
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

/// An HTTP/2 connection with a deadline on its first stream.
pub struct FirstStream<S> {
    inner: S,
    arrived: Arrived,
    /// Until a stream arrives or the deadline passes; `None` after.
    sleep: Option<Pin<Box<Sleep>>>,
    /// The deadline passed with no stream: the connection reads as ended.
    ended: bool,
    /// Fired: counted by the caller.
    pub on_timeout: Option<Box<dyn FnOnce() + Send>>,
    /// Bytes read before hyper took the connection (the preface, and what
    /// came with it), handed back before anything else is read.
    replay: BytesMut,
}

impl<S> FirstStream<S> {
    /// `read`: what was read from `inner` already.
    pub fn new(inner: S, deadline: Instant, arrived: Arrived, read: BytesMut) -> Self {
        FirstStream {
            inner,
            arrived,
            sleep: Some(Box::pin(tokio::time::sleep_until(deadline))),
            ended: false,
            on_timeout: None,
            replay: read,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FirstStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(Ok(()));
        }
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay[..n]);
            this.replay.advance(n);
            return Poll::Ready(Ok(()));
        }
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if read.is_ready() {
            return read;
        }
        let Some(sleep) = this.sleep.as_mut() else {
            return Poll::Pending;
        };
        if this.arrived.is_set() {
            this.sleep = None;
            return Poll::Pending;
        }
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.sleep = None;
        if this.arrived.is_set() {
            return Poll::Pending;
        }
        if let Some(f) = this.on_timeout.take() {
            f();
        }
        this.ended = true;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FirstStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
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
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn in_10s() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    #[tokio::test(start_paused = true)]
    async fn the_bytes_read_already_come_first_then_the_stream() {
        let (client, server) = tokio::io::duplex(4096);
        let mut s = FirstStream::new(server, in_10s(), Arrived::default(), PREFACE.into());
        let (_cr, mut cw) = tokio::io::split(client);
        cw.write_all(b"frames").await.unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(s.read(&mut buf).await.unwrap(), 4);
        assert_eq!(&buf, b"PRI ");
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], &PREFACE[4..]);
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"frames");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_opens_no_stream_is_closed_without_a_408() {
        let (client, server) = tokio::io::duplex(4096);
        let fired = Arc::new(AtomicBool::new(false));
        let f = fired.clone();
        let mut s = FirstStream::new(server, in_10s(), Arrived::default(), BytesMut::new());
        s.on_timeout = Some(Box::new(move || f.store(true, Ordering::SeqCst)));
        let (mut cr, _cw) = tokio::io::split(client);
        // Silence past the deadline: the connection reads as ended.
        let mut buf = [0u8; 64];
        assert_eq!(s.read(&mut buf).await.unwrap(), 0);
        assert!(fired.load(Ordering::SeqCst));
        drop(s);
        let mut got = Vec::new();
        cr.read_to_end(&mut got).await.unwrap();
        assert!(
            got.is_empty(),
            "no HTTP/1 answer to an HTTP/2 client: {got:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_with_a_stream_keeps_its_connection() {
        let (client, server) = tokio::io::duplex(4096);
        let arrived = Arrived::default();
        let mut s = FirstStream::new(server, in_10s(), arrived.clone(), BytesMut::new());
        let (_cr, mut cw) = tokio::io::split(client);
        cw.write_all(b"HEADERS").await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(s.read(&mut buf).await.unwrap(), 7);
        arrived.mark();
        tokio::time::sleep(Duration::from_secs(60)).await;
        cw.write_all(b"x").await.unwrap();
        assert_eq!(s.read(&mut buf).await.unwrap(), 1);
        s.write_all(b"SETTINGS").await.unwrap();
    }
}
