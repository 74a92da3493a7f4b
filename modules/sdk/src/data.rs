//! The data listener: accepts the connections the NLB forwards, reads their
//! PROXY v2 header when the module asked for one, counts them, and hands
//! each to [`crate::Module::serve`] on its own task. Every live connection
//! is tracked so the SDK can ask it to finish (drain, shed) and close it at
//! a deadline.
//!
//! Connections are served on the data threads ([`spawn_workers`]), nginx's
//! shape: each thread runs its own single-threaded runtime and accepts from
//! the one listening socket, so a connection, its requests and whatever it
//! opens (an upstream connection, say) stay on one thread, with no
//! cross-thread wake-ups. A thread that holds clearly more connections
//! than another hands a new one over to it ([`shared_types::spread`]). The
//! control side (ModuleService, heartbeats, admin) runs on the main
//! runtime.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use shared_types::id_map::IdMap;
use shared_types::proxy_v2::{self, Decoded};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{watch, Notify};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::context::Context;
use crate::module::Module;
use crate::stats::{ConnectionGuard, Stats};
use shared_types::spread::{Placed, Spread};

/// One data connection, handed to the module.
pub struct Connection {
    /// The socket, counting bytes into the module's stats.
    pub stream: Metered<TcpStream>,
    /// The client: the PROXY v2 source when the NLB sent one, else the peer.
    pub client: SocketAddr,
    /// The peer of the socket (the NLB, when it forwards).
    pub peer: SocketAddr,
    /// The address the connection arrived at.
    pub local: SocketAddr,
    /// The PROXY v2 header, when the module asked for one.
    pub proxy_header: Option<proxy_v2::Header>,
    /// Resolves when the SDK wants this connection to finish.
    pub closing: Closing,
    /// Stats, rate limits and identity of the module.
    pub ctx: Arc<Context>,
    _guard: ConnectionGuard,
}

impl Connection {
    /// Resolves when the SDK asks this connection to finish (drain, shed):
    /// finish the request in flight, then return from `serve`.
    pub async fn closing(&mut self) {
        self.closing.wait().await;
    }
}

/// A connection's "please finish" signal.
#[derive(Clone, Default)]
pub struct Closing(Arc<CloseSignal>);

/// A flag and the tasks waiting for it: a watch channel's worth for one
/// bool, at a fraction of its setup cost (paid on every connection).
#[derive(Default)]
struct CloseSignal {
    closing: AtomicBool,
    changed: Notify,
}

impl CloseSignal {
    fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }
}

impl Closing {
    /// A signal of its own, tied to no connection the SDK tracks (for a
    /// module's tests of its `serve`): [`Closing::close`] sets it.
    pub fn new() -> Self {
        Closing(Arc::default())
    }

    /// Asks whoever waits on this signal (and its clones) to finish.
    pub fn close(&self) {
        self.0.close();
    }

    /// Resolves once the connection should finish (at once if it already
    /// should).
    pub async fn wait(&mut self) {
        loop {
            let changed = self.0.changed.notified();
            tokio::pin!(changed);
            // Registered before the flag is read: a close in between wakes it.
            changed.as_mut().enable();
            if self.0.is_closing() {
                return;
            }
            changed.await;
        }
    }

    pub fn is_closing(&self) -> bool {
        self.0.is_closing()
    }
}

/// A stream that counts the bytes read and written into [`Stats`].
pub struct Metered<S> {
    inner: S,
    stats: Arc<Stats>,
}

impl<S> Metered<S> {
    pub fn new(inner: S, stats: Arc<Stats>) -> Self {
        Metered { inner, stats }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.stats.add_received(n as u64);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.stats.add_sent(n as u64);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.stats.add_sent(n as u64);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

struct Entry {
    closing: Arc<CloseSignal>,
    abort: Option<AbortHandle>,
}

impl Drop for Entry {
    /// The SDK lets go of the connection (it is going away): as a dropped
    /// watch sender did, this tells the connection to finish.
    fn drop(&mut self) {
        self.closing.close();
    }
}

/// The live data connections.
#[derive(Default)]
pub struct Connections {
    next: AtomicU64,
    /// By id: ids count up, so the smallest are the oldest.
    live: Mutex<IdMap<Entry>>,
    /// `live`'s length, read without the lock (every accept checks it).
    count: AtomicUsize,
    /// Drains waiting: closes notify only then.
    draining: AtomicUsize,
    changed: Notify,
}

/// Removes its connection from [`Connections`] when the task ends.
struct Tracked {
    conns: Arc<Connections>,
    id: u64,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.conns.live.lock().remove(&self.id);
        self.conns.count.fetch_sub(1, Ordering::Relaxed);
        if self.conns.draining.load(Ordering::Relaxed) > 0 {
            self.conns.changed.notify_waiters();
        }
    }
}

impl Connections {
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn track(self: &Arc<Self>) -> (Tracked, Closing) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let signal = Arc::new(CloseSignal::default());
        self.count.fetch_add(1, Ordering::Relaxed);
        self.live.lock().insert(
            id,
            Entry {
                closing: signal.clone(),
                abort: None,
            },
        );
        (
            Tracked {
                conns: self.clone(),
                id,
            },
            Closing(signal),
        )
    }

    fn set_abort(&self, id: u64, abort: AbortHandle) {
        if let Some(e) = self.live.lock().get_mut(&id) {
            e.abort = Some(abort);
        }
    }

    /// Asks the `n` oldest connections not already finishing to finish;
    /// closes those still open after `grace`. Returns how many were asked.
    pub fn shed(self: &Arc<Self>, n: usize, grace: Duration) -> usize {
        let picked: Vec<u64> = {
            let live = self.live.lock();
            let mut open: Vec<u64> = live
                .iter()
                .filter(|(_, e)| !e.closing.is_closing())
                .map(|(id, _)| *id)
                .collect();
            // The oldest first.
            if open.len() > n {
                open.select_nth_unstable(n);
                open.truncate(n);
            }
            for id in &open {
                live[id].closing.close();
            }
            open
        };
        if !picked.is_empty() {
            let conns = self.clone();
            let ids = picked.clone();
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                conns.abort(&ids);
            });
        }
        picked.len()
    }

    /// Asks every connection to finish.
    pub fn close_all(&self) {
        for e in self.live.lock().values() {
            e.closing.close();
        }
    }

    fn abort(&self, ids: &[u64]) {
        let live = self.live.lock();
        for id in ids {
            if let Some(a) = live.get(id).and_then(|e| e.abort.as_ref()) {
                a.abort();
            }
        }
    }

    /// Asks every connection to finish and waits until they have, or until
    /// `deadline`, when those left are closed. Returns how many were left.
    pub async fn drain(&self, deadline: Instant) -> usize {
        self.close_all();
        self.draining.fetch_add(1, Ordering::Relaxed);
        let emptied = loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.is_empty() {
                break true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                break false;
            }
        };
        self.draining.fetch_sub(1, Ordering::Relaxed);
        if emptied {
            return 0;
        }
        let ids: Vec<u64> = self.live.lock().keys().copied().collect();
        self.abort(&ids);
        ids.len()
    }
}

/// Why a connection was turned away before the module saw it.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error("no PROXY v2 header within {0:?}")]
    HeaderTimeout(Duration),
    #[error("{0}")]
    Header(#[from] proxy_v2::DecodeError),
    #[error("reading the PROXY v2 header: {0}")]
    Io(#[from] io::Error),
}

/// Reads exactly one PROXY v2 header from `stream`, and no byte more.
pub async fn read_proxy_header(
    stream: &mut TcpStream,
    max_len: usize,
) -> Result<proxy_v2::Header, AdmitError> {
    let mut buf = vec![0u8; 16];
    let mut have = 0;
    loop {
        let n = stream.read(&mut buf[have..]).await?;
        if n == 0 {
            return Err(AdmitError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the peer closed after {have} byte(s) of the PROXY v2 header"),
            )));
        }
        have += n;
        match proxy_v2::decode(&buf[..have], max_len)? {
            Decoded::Complete { header, .. } => return Ok(header),
            Decoded::Incomplete { needed_total } => {
                if buf.len() < needed_total {
                    buf.resize(needed_total, 0);
                }
            }
        }
    }
}

/// Settings of the accept loop.
#[derive(Debug, Clone)]
pub struct DataSettings {
    pub proxy_protocol: bool,
    pub proxy_header_timeout: Duration,
    /// 0 = unlimited.
    pub max_connections: usize,
}

thread_local! {
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The data thread the caller runs on (0-based), or `None` off the data
/// threads (the control runtime, a test). Modules use it to keep
/// per-thread state, such as pools of upstream connections, without locks
/// shared between threads.
pub fn worker() -> Option<usize> {
    WORKER.with(Cell::get)
}

/// The data threads, each accepting from the same listening socket.
pub struct Workers {
    accepting: Vec<tokio::sync::oneshot::Receiver<()>>,
    exit: watch::Sender<bool>,
}

impl Workers {
    /// Resolves once every thread has stopped accepting (after `stop`
    /// turned true).
    pub async fn stopped_accepting(&mut self) {
        for done in self.accepting.drain(..) {
            let _ = done.await;
        }
    }
}

impl Drop for Workers {
    /// Ends the threads: the connections left on them are dropped (after a
    /// drain, none are left).
    fn drop(&mut self) {
        let _ = self.exit.send(true);
    }
}

/// Starts `threads` data threads (at least one). Each runs a
/// single-threaded runtime with its own handle on `listener`'s socket and
/// serves what it accepts, or what another thread hands over, until `stop`
/// turns true; the thread then lives on until the returned [`Workers`] is
/// dropped, so the connections it holds can drain.
pub fn spawn_workers(
    listener: TcpListener,
    threads: usize,
    module: Arc<dyn Module>,
    ctx: Arc<Context>,
    conns: Arc<Connections>,
    settings: DataSettings,
    stop: watch::Receiver<bool>,
) -> io::Result<Workers> {
    let listener = listener.into_std()?;
    // Nagle off on the listening socket: accepted sockets inherit it, so
    // no connection pays a system call for it.
    socket2::SockRef::from(&listener).set_tcp_nodelay(true)?;
    let threads = threads.max(1);
    let spread = Spread::new(threads);
    let runtimes = (0..threads)
        .map(|_| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        })
        .collect::<io::Result<Vec<_>>>()?;
    let handles: Arc<[Handle]> = runtimes.iter().map(|r| r.handle().clone()).collect();
    let (exit, exiting) = watch::channel(false);
    let mut accepting = Vec::new();
    for (index, runtime) in runtimes.into_iter().enumerate() {
        let socket = listener.try_clone()?;
        let (done, accepted) = tokio::sync::oneshot::channel();
        accepting.push(accepted);
        let shared = Shared {
            module: module.clone(),
            ctx: ctx.clone(),
            conns: conns.clone(),
            settings: settings.clone(),
        };
        let peers = Peers {
            index,
            spread: spread.clone(),
            runtimes: handles.clone(),
        };
        let (stop, mut exiting) = (stop.clone(), exiting.clone());
        std::thread::Builder::new()
            .name(format!("data-{index}"))
            .spawn(move || {
                WORKER.with(|w| w.set(Some(index)));
                runtime.block_on(async move {
                    tokio::spawn(shared_types::data_thread::keep_a_timer_due());
                    match TcpListener::from_std(socket) {
                        Ok(listener) => accept_loop(listener, &shared, peers, stop).await,
                        Err(e) => {
                            tracing::error!(thread = index, error = %e, "data thread cannot use the listener");
                        }
                    }
                    let _ = done.send(());
                    let _ = exiting.wait_for(|e| *e).await;
                });
            })?;
    }
    Ok(Workers { accepting, exit })
}

/// What every data thread serves with.
struct Shared {
    module: Arc<dyn Module>,
    ctx: Arc<Context>,
    conns: Arc<Connections>,
    settings: DataSettings,
}

/// One data thread's place among the others.
struct Peers {
    index: usize,
    spread: Arc<Spread>,
    /// Every thread's runtime, this one's too, by index.
    runtimes: Arc<[Handle]>,
}

/// Where a connection is served: on the thread that accepted it, or,
/// taken off that thread's reactor, on another.
enum Served {
    Here(TcpStream),
    There(std::net::TcpStream),
}

/// Accepts until `stop` turns true, then drops the listener (the port stops
/// taking connections; those accepted keep running).
async fn accept_loop(
    listener: TcpListener,
    shared: &Shared,
    peers: Peers,
    mut stop: watch::Receiver<bool>,
) {
    let local = listener.local_addr().ok();
    // One wait for the stop signal across all accepts (a new one per
    // accept cost a watch poll and its waker registration each time).
    let stopped = stop.wait_for(|s| *s);
    tokio::pin!(stopped);
    loop {
        let accepted = tokio::select! {
            _ = &mut stopped => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors (or a transient error): back off
                // rather than spin.
                tracing::warn!(error = %e, "data listener: accept failed; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let conns = &shared.conns;
        if shared.settings.max_connections > 0 && conns.len() >= shared.settings.max_connections {
            shared.ctx.counters.refused_full.inc();
            tracing::debug!(%peer, max = shared.settings.max_connections, "data connection refused: at max_connections");
            drop(stream);
            continue;
        }
        let placed = peers.spread.place(peers.index);
        let to = placed.thread();
        let served = if to == peers.index {
            Served::Here(stream)
        } else {
            // Another thread holds clearly fewer: it serves this one.
            match stream.into_std() {
                Ok(s) => Served::There(s),
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "data connection closed: it could not be handed to another data thread");
                    continue;
                }
            }
        };
        start(&peers.runtimes[to], served, (peer, local), placed, shared);
    }
}

/// Serves a connection on a task of its own on `runtime`'s thread.
fn start(
    runtime: &Handle,
    served: Served,
    (peer, local): (SocketAddr, Option<SocketAddr>),
    placed: Placed,
    shared: &Shared,
) {
    let (tracked, closing) = shared.conns.track();
    let id = tracked.id;
    let module = shared.module.clone();
    let ctx = shared.ctx.clone();
    let settings = shared.settings.clone();
    // Boxed: tokio moves a task's future several times while spawning it
    // and at each change of stage; a box moves as one pointer.
    let task = runtime.spawn(Box::pin(async move {
        let _counted = (tracked, placed);
        let stream = match served {
            Served::Here(stream) => stream,
            Served::There(stream) => match TcpStream::from_std(stream) {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "data connection closed: its data thread could not take it");
                    return;
                }
            },
        };
        serve_one(stream, peer, local, closing, module, ctx, &settings).await;
    }));
    shared.conns.set_abort(id, task.abort_handle());
}

async fn serve_one(
    mut stream: TcpStream,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    closing: Closing,
    module: Arc<dyn Module>,
    ctx: Arc<Context>,
    settings: &DataSettings,
) {
    let local = local
        .or_else(|| stream.local_addr().ok())
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut client = peer;
    let mut proxy_header = None;
    if settings.proxy_protocol {
        let read = tokio::time::timeout(
            settings.proxy_header_timeout,
            read_proxy_header(&mut stream, proxy_v2::DEFAULT_MAX_LEN),
        )
        .await
        .unwrap_or(Err(AdmitError::HeaderTimeout(
            settings.proxy_header_timeout,
        )));
        match read {
            Ok(h) => {
                if let Some(src) = h.source() {
                    // An IPv4 client relayed as IPv4-mapped IPv6 is IPv4.
                    client = SocketAddr::new(src.ip().to_canonical(), src.port());
                }
                proxy_header = Some(h);
            }
            Err(e) => {
                ctx.counters.bad_proxy_header.inc();
                tracing::debug!(%peer, error = %e, "data connection closed: bad PROXY v2 header");
                return;
            }
        }
    }
    // Counted once it is the module's: a connection refused for its header
    // is counted as refused only.
    let guard = ctx.stats.connection();
    let conn = Connection {
        stream: Metered::new(stream, ctx.stats.clone()),
        client,
        peer,
        local,
        proxy_header,
        closing,
        ctx,
        _guard: guard,
    };
    module.serve(conn).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shedding_asks_the_oldest_open_connections_once() {
        let conns = Arc::new(Connections::default());
        let tracked: Vec<(Tracked, Closing)> = (0..10).map(|_| conns.track()).collect();
        // The two oldest are finishing already: not asked again, not counted.
        tracked[0].1.close();
        tracked[1].1.close();
        assert_eq!(conns.shed(3, Duration::from_secs(60)), 3);
        let closing: Vec<bool> = tracked.iter().map(|(_, c)| c.is_closing()).collect();
        assert_eq!(
            closing,
            [true, true, true, true, true, false, false, false, false, false]
        );
        // More than are open: all that are left.
        assert_eq!(conns.shed(100, Duration::from_secs(60)), 5);
        assert!(tracked.iter().all(|(_, c)| c.is_closing()));
        assert_eq!(conns.shed(1, Duration::from_secs(60)), 0);
        assert_eq!(conns.len(), 10);
        drop(tracked);
        assert!(conns.is_empty());
    }
}
