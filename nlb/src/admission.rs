//! Admission of connections to the gRPC control port: a connection must send
//! the whole HTTP/2 client preface (the 24-byte magic and a SETTINGS frame
//! header) within a deadline before the gRPC server sees it. Anything else is
//! closed at once, and a connection that says nothing is closed at the
//! deadline, so silent or half-open clients hold neither a slot nor a
//! graceful shutdown.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_stream::wrappers::ReceiverStream;

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

/// Accepts connections until `stop`, admitting those that send a preface in
/// time. Accept errors (such as running out of file descriptors) back off
/// instead of spinning.
pub fn incoming(
    listener: TcpListener,
    deadline: Duration,
    mut stop: watch::Receiver<bool>,
) -> ReceiverStream<io::Result<TcpStream>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let pending = Arc::new(Semaphore::new(MAX_PENDING));
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|s| *s) => break,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept on the gRPC port failed; backing off");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&pending).try_acquire_owned() else {
                tracing::warn!(%peer, "too many connections still completing their preface; closing");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let tx = tx.clone();
            let mut stop = stop.clone();
            tokio::spawn(async move {
                let admitted = tokio::select! {
                    r = await_preface(&stream, deadline) => r,
                    _ = stop.wait_for(|s| *s) => Err(Refused::Closed),
                };
                drop(permit);
                match admitted {
                    Ok(()) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Err(why) => {
                        tracing::debug!(%peer, %why, "gRPC connection closed before admission")
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
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
