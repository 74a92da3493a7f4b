//! Admission of connections to the NLB's own ports. On the gRPC port a
//! plaintext connection must send the whole HTTP/2 client preface (the
//! 24-byte magic and a SETTINGS frame header) within a deadline before the
//! gRPC server sees it; with TLS, the handshake must finish within it.
//! Anything else is closed, and a connection that says nothing is closed at
//! the deadline, so silent or half-open clients hold neither a slot nor a
//! graceful shutdown.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_stream::wrappers::ReceiverStream;

use crate::tls::ReloadingTls;

/// The client connection preface of HTTP/2 (RFC 9113, section 3.4).
pub const H2_MAGIC: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Magic plus a frame header.
const PREFACE_LEN: usize = 24 + 9;
const SETTINGS_FRAME: u8 = 0x04;
/// Connections waiting to complete their preface at once; more are closed.
pub const MAX_PENDING: usize = 1024;

/// Why a connection was not admitted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    #[error("the client sent bytes that are not an HTTP/2 preface")]
    NotHttp2,
    #[error("the client closed before completing the HTTP/2 preface")]
    Closed,
    #[error("no HTTP/2 preface within {0:?}")]
    Timeout(Duration),
    #[error("reading the preface failed: {0}")]
    Io(String),
    #[error("TLS handshake failed: {0}")]
    Tls(String),
}

/// Waits until `stream` has sent a valid HTTP/2 preface, without consuming
/// it (the gRPC server reads it again).
pub async fn await_preface(stream: &TcpStream, deadline: Duration) -> Result<(), Refused> {
    let check = async {
        let mut buf = [0u8; PREFACE_LEN];
        loop {
            let n = stream
                .peek(&mut buf)
                .await
                .map_err(|e| Refused::Io(e.to_string()))?;
            if n == 0 {
                return Err(Refused::Closed);
            }
            let m = n.min(H2_MAGIC.len());
            if buf[..m] != H2_MAGIC[..m] {
                return Err(Refused::NotHttp2);
            }
            if n >= PREFACE_LEN {
                return if buf[24 + 3] == SETTINGS_FRAME {
                    Ok(())
                } else {
                    Err(Refused::NotHttp2)
                };
            }
            // Part of the preface has arrived; peek returns at once while
            // bytes are waiting, so pause before looking again.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(deadline, check)
        .await
        .unwrap_or(Err(Refused::Timeout(deadline)))
}

/// An admitted connection: plain TCP or TLS over it.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// What the servers learn about a connection (tonic puts it in each
/// request's extensions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    pub tls: bool,
}

impl Conn {
    pub fn peer(&self) -> PeerInfo {
        match self {
            Conn::Plain(s) => PeerInfo {
                remote: s.peer_addr().ok(),
                tls: false,
            },
            Conn::Tls(s) => PeerInfo {
                remote: s.get_ref().0.peer_addr().ok(),
                tls: true,
            },
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.peer()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// How a port admits connections.
#[derive(Clone)]
pub struct Admission {
    /// The port's name in logs (`gRPC`, `admin`).
    pub port: &'static str,
    /// Plaintext connections must send an HTTP/2 preface first (the gRPC port).
    pub require_h2_preface: bool,
    /// TLS, if the port has it: the handshake must finish within `deadline`.
    pub tls: Option<Arc<ReloadingTls>>,
    /// For the preface or the TLS handshake.
    pub deadline: Duration,
}

impl Admission {
    /// Admits one accepted connection, or says why not.
    pub async fn admit(&self, stream: TcpStream) -> Result<Conn, Refused> {
        if let Some(tls) = &self.tls {
            let handshake = tls.acceptor().accept(stream);
            return match tokio::time::timeout(self.deadline, handshake).await {
                Ok(Ok(s)) => Ok(Conn::Tls(Box::new(s))),
                Ok(Err(e)) => Err(Refused::Tls(e.to_string())),
                Err(_) => Err(Refused::Timeout(self.deadline)),
            };
        }
        if self.require_h2_preface {
            await_preface(&stream, self.deadline).await?;
        }
        Ok(Conn::Plain(stream))
    }

    /// Whether admitting takes time (so it runs in its own task).
    fn waits(&self) -> bool {
        self.tls.is_some() || self.require_h2_preface
    }
}

/// Accepts connections until `stop`, admitting them by `admission`.
/// Accept errors (such as running out of file descriptors) back off instead
/// of spinning; at most [`MAX_PENDING`] connections wait for admission.
pub fn incoming(
    listener: TcpListener,
    admission: Admission,
    mut stop: watch::Receiver<bool>,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let pending = Arc::new(Semaphore::new(MAX_PENDING));
        let port = admission.port;
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|s| *s) => break,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, port, "accept failed; backing off");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            if !admission.waits() {
                if tx.send(Ok(Conn::Plain(stream))).await.is_err() {
                    break;
                }
                continue;
            }
            let Ok(permit) = Arc::clone(&pending).try_acquire_owned() else {
                tracing::warn!(%peer, port, "too many connections still completing their handshake; closing");
                continue;
            };
            let tx = tx.clone();
            let mut stop = stop.clone();
            let admission = admission.clone();
            tokio::spawn(async move {
                let admitted = tokio::select! {
                    r = admission.admit(stream) => r,
                    _ = stop.wait_for(|s| *s) => Err(Refused::Closed),
                };
                drop(permit);
                match admitted {
                    Ok(conn) => {
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Err(why) => {
                        tracing::debug!(%peer, port, %why, "connection closed before admission")
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Admitted connections as an axum listener (the admin port).
pub struct AdmittedListener {
    conns: ReceiverStream<io::Result<Conn>>,
    local: SocketAddr,
}

impl AdmittedListener {
    pub fn new(conns: ReceiverStream<io::Result<Conn>>, local: SocketAddr) -> Self {
        AdmittedListener { conns, local }
    }
}

impl axum::serve::Listener for AdmittedListener {
    type Io = Conn;
    type Addr = PeerInfo;

    async fn accept(&mut self) -> (Conn, PeerInfo) {
        use tokio_stream::StreamExt;
        loop {
            match self.conns.next().await {
                Some(Ok(conn)) => {
                    let peer = conn.peer();
                    return (conn, peer);
                }
                Some(Err(_)) => continue,
                // Accepting stopped: the server is shutting down and waits
                // for its graceful-shutdown signal, not for more connections.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<PeerInfo> {
        Ok(PeerInfo {
            remote: Some(self.local),
            tls: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    fn preface() -> Vec<u8> {
        let mut p = H2_MAGIC.to_vec();
        p.extend_from_slice(&[0, 0, 0, SETTINGS_FRAME, 0, 0, 0, 0, 0]);
        p
    }

    #[tokio::test]
    async fn a_whole_preface_is_admitted_even_in_pieces() {
        let (mut c, s) = pair().await;
        let p = preface();
        c.write_all(&p[..10]).await.unwrap();
        let wait = tokio::spawn(async move { await_preface(&s, Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.write_all(&p[10..]).await.unwrap();
        assert_eq!(wait.await.unwrap(), Ok(()));
    }

    #[tokio::test]
    async fn garbage_silence_and_early_close_are_refused() {
        let (mut c, s) = pair().await;
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(
            await_preface(&s, Duration::from_secs(10)).await,
            Err(Refused::NotHttp2)
        );

        let (mut c, s) = pair().await;
        let mut bad = preface();
        bad[24 + 3] = 0x01; // a HEADERS frame first
        c.write_all(&bad).await.unwrap();
        assert_eq!(
            await_preface(&s, Duration::from_secs(10)).await,
            Err(Refused::NotHttp2)
        );

        let (_c, s) = pair().await;
        let d = Duration::from_millis(100);
        assert_eq!(await_preface(&s, d).await, Err(Refused::Timeout(d)));

        let (c, s) = pair().await;
        drop(c);
        assert_eq!(
            await_preface(&s, Duration::from_secs(10)).await,
            Err(Refused::Closed)
        );

        // Part of the magic, then a close: peeking cannot see the close behind
        // unread bytes, so the deadline ends it.
        let (mut c, s) = pair().await;
        c.write_all(&H2_MAGIC[..5]).await.unwrap();
        drop(c);
        assert_eq!(await_preface(&s, d).await, Err(Refused::Timeout(d)));
    }
}
