//! Copying bytes both ways between two sockets, half-close aware, with an
//! idle timeout. A buffer is taken from a per-thread pool only while bytes
//! move and given back before waiting again, so an idle connection holds
//! none.

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

thread_local! {
    static BUFFERS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// Buffers kept per thread for reuse.
const KEPT: usize = 64;

fn take(size: usize) -> Box<[u8]> {
    BUFFERS
        .with(|b| {
            let mut b = b.borrow_mut();
            while let Some(buf) = b.pop() {
                if buf.len() == size {
                    return Some(buf);
                }
            }
            None
        })
        .unwrap_or_else(|| vec![0u8; size].into_boxed_slice())
}

fn give(buf: Box<[u8]>) {
    BUFFERS.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < KEPT {
            b.push(buf);
        }
    });
}

/// Bytes moved each way.
#[derive(Debug, Default)]
pub struct Flow {
    /// Client to instance.
    pub up: AtomicU64,
    /// Instance to client.
    pub down: AtomicU64,
}

impl Flow {
    fn moved(&self) -> u64 {
        self.up.load(Ordering::Relaxed) + self.down.load(Ordering::Relaxed)
    }
}

/// How a copy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed their end.
    Closed,
    /// No byte either way for the idle timeout.
    Idle,
    /// A side failed (reset, broken pipe).
    Error,
}

impl End {
    pub fn name(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Idle => "idle_timeout",
            End::Error => "reset",
        }
    }
}

/// How a copy ended, and what the upstream (the instance) did: what a
/// rollout's analysis counts against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ending {
    pub end: End,
    /// Reading from the upstream failed: it reset the connection.
    pub upstream_reset: bool,
    /// The upstream ended its side (closed or reset) while the client's
    /// was still open: the instance, not the client, ended the exchange.
    pub upstream_first: bool,
}

/// How one direction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    /// Its source closed; the end was passed on.
    Done,
    /// Writing failed: the destination is gone. The other direction may
    /// still deliver what it has.
    WriteFailed,
    /// Reading failed: the source was reset.
    ReadFailed,
}

/// Copies `client` <-> `upstream` until both directions have ended, or a
/// source is reset, or nothing moves for `idle`. A direction whose
/// destination is gone stops without cutting the other short (an origin's
/// early answer still reaches a client that is still uploading).
pub async fn both_ways(
    client: &TcpStream,
    upstream: &TcpStream,
    buffer: usize,
    idle: Duration,
    flow: &Flow,
) -> Ending {
    let copy = async {
        let ended = AtomicBool::new(false);
        let up = one_way(client, upstream, buffer, &flow.up, &ended);
        let down = one_way(upstream, client, buffer, &flow.down, &ended);
        tokio::pin!(up, down);
        let (mut up_end, mut down_end) = (None, None);
        let mut upstream_first = false;
        loop {
            // In order (`biased`): each branch completes once, so neither
            // can starve the other, and the random start costs a draw from
            // the thread's generator at each turn.
            tokio::select! {
                biased;
                w = &mut up, if up_end.is_none() => up_end = Some(w),
                w = &mut down, if down_end.is_none() => down_end = Some(w),
            }
            ended.store(true, Ordering::Relaxed);
            if down_end.is_some() && up_end.is_none() {
                upstream_first = true;
            }
            let end = match (up_end, down_end) {
                (Some(Way::ReadFailed), _) | (_, Some(Way::ReadFailed)) => End::Error,
                (Some(Way::Done), Some(Way::Done)) => End::Closed,
                (Some(_), Some(_)) => End::Error,
                _ => continue,
            };
            return Ending {
                end,
                upstream_reset: down_end == Some(Way::ReadFailed),
                upstream_first,
            };
        }
    };
    // The watchdog wakes four times per idle period and compares the bytes
    // moved (nothing is done per chunk): a connection closes between the
    // idle timeout and a quarter more after its last byte.
    let watchdog = async {
        const CHECKS: u32 = 4;
        let step = idle / CHECKS;
        let (mut seen, mut still) = (flow.moved(), 0);
        loop {
            tokio::time::sleep(step).await;
            let now = flow.moved();
            if now == seen {
                still += 1;
                if still >= CHECKS {
                    return;
                }
            } else {
                (seen, still) = (now, 0);
            }
        }
    };
    tokio::select! {
        biased;
        ending = copy => ending,
        () = watchdog => Ending {
            end: End::Idle,
            upstream_reset: false,
            upstream_first: false,
        },
    }
}

/// Copies `from` to `to` until `from` ends, then ends `to`'s writing side
/// (the other direction goes on). `ended`: whether a direction has ended,
/// shared by the two (set by [`both_ways`] when one does).
async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    buffer: usize,
    count: &AtomicU64,
    ended: &AtomicBool,
) -> Way {
    // After a failed write, what still comes is read and dropped until the
    // source ends: closing a socket with unread bytes would reset it, and
    // the reset could destroy an answer the other direction delivered.
    let mut discarding = false;
    loop {
        if from.readable().await.is_err() {
            return Way::ReadFailed;
        }
        let mut buf = take(buffer);
        let n = match from.try_read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                give(buf);
                continue;
            }
            Err(_) => {
                give(buf);
                return Way::ReadFailed;
            }
        };
        if n > 0 && n < buf.len() {
            // A short read has drained the socket, and epoll (edge
            // triggered) reports the next bytes anew: the readiness is
            // forgotten, so the next turn waits for them instead of asking
            // the kernel once more for nothing (a read that fails with
            // EAGAIN, one per message each way). tokio does the same for
            // its own short reads; `try_read` leaves it to the caller.
            let _ = from.try_io(Interest::READABLE, || {
                Err::<(), _>(io::ErrorKind::WouldBlock.into())
            });
        }
        if n == 0 {
            give(buf);
            if discarding {
                return Way::WriteFailed;
            }
            // The peer is done sending: say so to the other side, whose
            // answer may still come. When the other direction has ended
            // already, the copy ends with this one and closing the socket
            // says it (a system call fewer per connection).
            if !ended.load(Ordering::Relaxed) {
                let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
            }
            return Way::Done;
        }
        if discarding {
            give(buf);
            continue;
        }
        let written = write_all(to, &buf[..n]).await;
        give(buf);
        if written.is_err() {
            discarding = true;
            continue;
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Writes all of `data`, waiting whenever the socket is full.
pub async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match to.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A connected pair of sockets: (the proxy's side, the peer's side).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (ours, _) = l.accept().await.unwrap();
        (ours, peer)
    }

    /// A client and an origin with a copy between them (idle timeout
    /// `idle`): the client, the origin, the copy's byte counts and its end.
    async fn proxied(
        idle: Duration,
    ) -> (
        TcpStream,
        TcpStream,
        std::sync::Arc<Flow>,
        tokio::task::JoinHandle<Ending>,
    ) {
        let (client_side, client) = pair().await;
        let (upstream_side, origin) = pair().await;
        let flow = std::sync::Arc::new(Flow::default());
        let f = flow.clone();
        let copy =
            tokio::spawn(
                async move { both_ways(&client_side, &upstream_side, 1024, idle, &f).await },
            );
        (client, origin, flow, copy)
    }

    #[tokio::test]
    async fn a_half_close_is_passed_on_and_the_answer_still_comes_back() {
        let (mut client, mut origin, _flow, proxy) = proxied(Duration::from_secs(30)).await;
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        // The origin reads to the end, then answers and closes.
        let mut got = Vec::new();
        origin.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request");
        origin.write_all(&vec![7u8; 100_000]).await.unwrap();
        drop(origin);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer.len(), 100_000);
        assert_eq!(proxy.await.unwrap().end, End::Closed);
    }

    #[tokio::test]
    async fn an_early_answer_reaches_a_client_still_uploading() {
        let (mut client, mut origin, _flow, proxy) = proxied(Duration::from_secs(30)).await;
        // The origin answers at once and closes without reading the upload.
        origin
            .write_all(b"HTTP/1.1 413 Too Large\r\n\r\n")
            .await
            .unwrap();
        drop(origin);
        let upload = tokio::spawn(async move {
            let chunk = vec![1u8; 16 * 1024];
            for _ in 0..64 {
                if client.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            client
        });
        let mut client = upload.await.unwrap();
        let mut answer = [0u8; 26];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 413 Too Large\r\n\r\n");
        // The rest of the upload was read and dropped; the client closing
        // ends the copy.
        drop(client);
        assert_eq!(proxy.await.unwrap().end, End::Error);
    }

    #[tokio::test]
    async fn who_ended_first_and_an_upstream_reset_are_told_apart() {
        // The client closes first: the upstream's close follows it.
        let (mut client, mut origin, _flow, proxy) = proxied(Duration::from_secs(30)).await;
        client.write_all(b"question").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        origin.read_to_end(&mut got).await.unwrap();
        drop(origin);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        let ending = proxy.await.unwrap();
        assert_eq!(
            (ending.end, ending.upstream_first, ending.upstream_reset),
            (End::Closed, false, false)
        );

        // The upstream closes while the client waits for its answer.
        let (mut client, mut origin, _flow, proxy) = proxied(Duration::from_secs(30)).await;
        client.write_all(b"question").await.unwrap();
        let mut buf = [0u8; 8];
        origin.read_exact(&mut buf).await.unwrap();
        drop(origin);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        drop(client);
        let ending = proxy.await.unwrap();
        assert_eq!(
            (ending.upstream_first, ending.upstream_reset),
            (true, false)
        );

        // The upstream resets the connection (SO_LINGER 0).
        let (mut client, mut origin, _flow, proxy) = proxied(Duration::from_secs(30)).await;
        client.write_all(b"question").await.unwrap();
        origin.read_exact(&mut buf).await.unwrap();
        socket2::SockRef::from(&origin)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(origin);
        let mut rest = Vec::new();
        let _ = client.read_to_end(&mut rest).await;
        drop(client);
        let ending = proxy.await.unwrap();
        assert_eq!(
            (ending.end, ending.upstream_first, ending.upstream_reset),
            (End::Error, true, true)
        );
    }

    #[tokio::test]
    async fn nothing_moving_for_the_idle_timeout_ends_the_copy() {
        let (_client, _origin, _flow, copy) = proxied(Duration::from_millis(200)).await;
        assert_eq!(copy.await.unwrap().end, End::Idle);
    }

    #[tokio::test]
    async fn bytes_are_counted_each_way() {
        let (mut client, mut origin, flow, proxy) = proxied(Duration::from_secs(30)).await;
        client.write_all(&[0u8; 3000]).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        origin.read_to_end(&mut got).await.unwrap();
        origin.write_all(&[0u8; 5000]).await.unwrap();
        drop(origin);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        proxy.await.unwrap();
        assert_eq!(flow.up.load(Ordering::Relaxed), 3000);
        assert_eq!(flow.down.load(Ordering::Relaxed), 5000);
    }
}
