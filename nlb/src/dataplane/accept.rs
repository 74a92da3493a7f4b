//! Accepting on a data thread without registering the accepted socket.
//!
//! tokio's `TcpListener::accept` registers each accepted socket with the
//! accepting thread's reactor (an `epoll_ctl`). A connection that thread
//! hands to another (see [`shared_types::spread`]) was then taken off that
//! reactor (a second `epoll_ctl`) and put on the other (a third). An
//! [`Acceptor`] hands out plain sockets instead: whichever thread serves a
//! connection registers it once, with `tokio::net::TcpStream::from_std`.
//!
//! One thing tokio's accept does that `from_std` does not: it takes a new
//! socket for readable, so the first read tries it at once. A socket
//! registered by hand waits for the reactor's first event; the listeners
//! that read first make up for it (see `conn::read_arrived`). The module
//! SDK keeps tokio's accept for that reason: its modules read first.

use std::io;
use std::net::SocketAddr;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// A listening socket on one data thread's reactor.
pub struct Acceptor {
    listener: AsyncFd<mio::net::TcpListener>,
}

impl Acceptor {
    /// Puts `listener` (non-blocking, as `bind` left it) on the current
    /// thread's reactor. Must be called within a tokio runtime.
    pub fn new(listener: std::net::TcpListener) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let listener = mio::net::TcpListener::from_std(listener);
        Ok(Self {
            listener: register(listener)?,
        })
    }

    /// The next connection: a non-blocking socket on no reactor yet.
    pub async fn accept(&self) -> io::Result<(std::net::TcpStream, SocketAddr)> {
        loop {
            let mut ready = self.listener.readable().await?;
            if let Ok(accepted) = ready.try_io(|l| l.get_ref().accept()) {
                return accepted.map(|(stream, peer)| (stream.into(), peer));
            }
        }
    }

    /// A connection already queued, without waiting; `None` when there is
    /// none, or accepting failed for want of descriptors or memory. A
    /// connection its client reset while it was queued is passed over.
    pub fn accept_queued(&self) -> Option<(std::net::TcpStream, SocketAddr)> {
        loop {
            match self.listener.get_ref().accept() {
                Ok((stream, peer)) => return Some((stream.into(), peer)),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => return None,
            }
        }
    }
}

/// `listener` on the current thread's reactor, for reading.
///
/// Unsafe for want of a safe constructor: tokio deprecated `AsyncFd::new`
/// as unsound for an inner value that may not own its descriptor.
#[allow(unsafe_code)]
fn register(listener: mio::net::TcpListener) -> io::Result<AsyncFd<mio::net::TcpListener>> {
    // SAFETY: the listener owns its descriptor, which so stays open, the
    // same description, and the one `as_raw_fd` returns for as long as the
    // `AsyncFd` owns the listener; nothing else can close it.
    unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }.map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[tokio::test]
    async fn accepted_sockets_are_non_blocking_and_serve_once_registered() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = Acceptor::new(listener).unwrap();
        assert!(acceptor.accept_queued().is_none(), "nothing queued yet");

        let mut client = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, peer) = acceptor.accept().await.unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        // Non-blocking: a read with nothing to read says so at once.
        let mut byte = [0u8; 1];
        let e = (&accepted).read(&mut byte).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);

        // Registered by whoever serves it, it works as any tokio stream.
        let mut served = tokio::net::TcpStream::from_std(accepted).unwrap();
        client.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        tokio::io::AsyncReadExt::read_exact(&mut served, &mut got)
            .await
            .unwrap();
        assert_eq!(&got, b"ping");
    }

    #[tokio::test]
    async fn queued_connections_are_taken_in_order_without_waiting() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = Acceptor::new(listener).unwrap();
        let clients: Vec<_> = (0..3)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let mut peers = Vec::new();
        // The handshakes complete in the kernel; give them a moment.
        for _ in 0..100 {
            match acceptor.accept_queued() {
                Some((_, peer)) => peers.push(peer),
                None if peers.len() == clients.len() => break,
                None => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
        let want: Vec<_> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
        assert_eq!(peers, want);
    }
}
