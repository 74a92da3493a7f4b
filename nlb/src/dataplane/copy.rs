//! Copying bytes both ways between two sockets, half-close aware, with an
//! idle timeout. A buffer is taken from a per-thread pool only while bytes
//! move and given back before waiting again, so an idle connection holds
//! none.

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;

use crate::routing::mono_ms;

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

/// Bytes moved each way, and when the last byte moved.
#[derive(Debug, Default)]
pub struct Flow {
    /// Client to instance.
    pub up: AtomicU64,
    /// Instance to client.
    pub down: AtomicU64,
    last_ms: AtomicU64,
}

impl Flow {
    fn touch(&self) {
        self.last_ms.store(mono_ms(), Ordering::Relaxed);
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

/// Copies `client` <-> `upstream` until both directions have ended, one
/// fails, or nothing moves for `idle`.
pub async fn both_ways(
    client: &TcpStream,
    upstream: &TcpStream,
    buffer: usize,
    idle: Duration,
    flow: &Flow,
) -> End {
    flow.touch();
    let copy = async {
        tokio::try_join!(
            one_way(client, upstream, buffer, flow, &flow.up),
            one_way(upstream, client, buffer, flow, &flow.down),
        )
    };
    let idle_ms = idle.as_millis() as u64;
    let watchdog = async {
        loop {
            let last = flow.last_ms.load(Ordering::Relaxed);
            let due = last + idle_ms;
            let now = mono_ms();
            if now >= due {
                return;
            }
            tokio::time::sleep(Duration::from_millis(due - now)).await;
        }
    };
    tokio::select! {
        r = copy => if r.is_ok() { End::Closed } else { End::Error },
        () = watchdog => End::Idle,
    }
}

/// Copies `from` to `to` until `from` ends, then ends `to`'s writing side
/// (the other direction goes on).
async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    buffer: usize,
    flow: &Flow,
    count: &AtomicU64,
) -> io::Result<()> {
    loop {
        from.readable().await?;
        let mut buf = take(buffer);
        let n = match from.try_read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                give(buf);
                continue;
            }
            Err(e) => {
                give(buf);
                return Err(e);
            }
        };
        if n == 0 {
            give(buf);
            // The peer is done sending: say so to the other side, whose
            // answer may still come.
            let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
            return Ok(());
        }
        let written = write_all(to, &buf[..n]).await;
        give(buf);
        written?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        flow.touch();
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
