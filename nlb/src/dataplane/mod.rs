//! The L4 data plane: listeners accept connections, find each one's
//! protocol (declared, or sniffed from its first bytes), route it with the
//! routing core's current snapshot, connect to an instance (the next one on
//! failure) and copy bytes both ways until either side is done.
//!
//! Connections are served on the data threads, nginx's shape: each runs its
//! own single-threaded runtime and accepts from every listener's socket, so
//! a connection and both its sockets stay on one thread with no
//! cross-thread wake-ups. The control API runs on the main runtime.
//!
//! Listener changes apply by difference: a listener whose address did not
//! change keeps its socket and connections (its other settings change in
//! place); a moved one binds its new address before the old socket
//! closes; a removed one stops accepting and its connections finish until
//! the drain deadline.

mod accept;
pub mod conn;
pub mod copy;
pub mod limit;
pub mod metrics;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use prometheus::{IntCounter, IntGauge};
use shared_types::spread::{Placed, Spread};
use tokio::sync::{watch, Notify};
use tokio::task::{AbortHandle, JoinHandle};

use crate::config::{DataplaneConfig, ListenerConfig};
use crate::routing::{Cidr, Detected, Router};
use accept::Acceptor;
use limit::SourceLimiter;
use metrics::DataplaneMetrics;

/// What a listener does with its connections; changed in place.
#[derive(Debug, Clone)]
pub struct ListenerSettings {
    /// `None`: sniffed (`auto`).
    pub protocol: Option<Detected>,
    pub proxy_protocol: bool,
    /// Peers allowed to send a PROXY v2 header; empty = any.
    pub trusted: Vec<Cidr>,
}

/// A listener as its connections see it.
pub struct ListenerShared {
    pub name: String,
    /// Tells this listener's connections from another's in [`Live`].
    id: u64,
    pub local: SocketAddr,
    pub settings: ArcSwap<ListenerSettings>,
    /// 0 = no limit of its own.
    pub max_connections: AtomicU32,
    open: AtomicUsize,
    active: IntGauge,
    bytes_up: IntCounter,
    bytes_down: IntCounter,
    /// `nlb_connections_total` by protocol family and module label,
    /// resolved on first use (no label hashing per connection).
    forwarded: [[std::sync::OnceLock<IntCounter>; MODULE_LABELS.len()]; FAMILIES.len()],
}

/// Every protocol family, in the order of [`ListenerShared::forwarded`].
const FAMILIES: [Detected; 9] = [
    Detected::Tls,
    Detected::Http1,
    Detected::Http2,
    Detected::Postgres,
    Detected::Mysql,
    Detected::Mongodb,
    Detected::Redis,
    Detected::Rtmp,
    Detected::Unknown,
];

/// Every `module` label value.
const MODULE_LABELS: [&str; 7] = [
    "backend",
    "alb",
    "dblb",
    "ailb",
    "rtmp",
    "nlb",
    "unspecified",
];

impl ListenerShared {
    /// The `nlb_connections_total` counter for `family` and `module`.
    pub(crate) fn forwarded(
        &self,
        metrics: &DataplaneMetrics,
        family: Detected,
        module: &'static str,
    ) -> &IntCounter {
        let f = FAMILIES
            .iter()
            .position(|d| *d == family)
            .unwrap_or(FAMILIES.len() - 1);
        let m = MODULE_LABELS
            .iter()
            .position(|l| *l == module)
            .unwrap_or(MODULE_LABELS.len() - 1);
        self.forwarded[f][m].get_or_init(|| {
            metrics.connections.with_label_values(&[
                self.name.as_str(),
                conn::family(family),
                MODULE_LABELS[m],
            ])
        })
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

struct Listener {
    spec: ListenerConfig,
    shared: Arc<ListenerShared>,
    stop_accept: watch::Sender<bool>,
    /// One accept loop per data thread.
    accepting: Vec<JoinHandle<()>>,
}

const LIVE_SHARDS: usize = 16;

/// Per connection id: its listener's id and its task (`None`: the task
/// ended before it was entered).
type LiveShard = Mutex<shared_types::id_map::IdMap<Option<(u64, AbortHandle)>>>;

/// Every connection task, so a drain deadline can close those left.
#[derive(Default)]
struct Live {
    shards: [LiveShard; LIVE_SHARDS],
}

impl Live {
    fn shard(&self, id: u64) -> &LiveShard {
        &self.shards[(id as usize) % LIVE_SHARDS]
    }

    fn enter(&self, id: u64, listener: u64, task: AbortHandle) {
        let mut shard = self.shard(id).lock();
        // The task may have ended already and left its mark.
        if shard.remove(&id).is_none() {
            shard.insert(id, Some((listener, task)));
        }
    }

    fn leave(&self, id: u64) {
        let mut shard = self.shard(id).lock();
        if shard.remove(&id).is_none() {
            shard.insert(id, None);
        }
    }

    /// Closes the connections of `listener` (all with `None`).
    fn abort(&self, listener: Option<u64>) {
        for shard in &self.shards {
            for (l, task) in shard.lock().values().flatten() {
                if listener.is_none_or(|want| want == *l) {
                    task.abort();
                }
            }
        }
    }
}

/// The data plane.
pub struct Dataplane {
    router: Arc<Router>,
    settings: ArcSwap<DataplaneConfig>,
    listeners: Mutex<BTreeMap<String, Listener>>,
    pub metrics: DataplaneMetrics,
    open: AtomicUsize,
    sniffing: AtomicUsize,
    /// Set while something waits for connections to close (drains), so
    /// closes notify only then.
    draining: AtomicUsize,
    closed: Notify,
    limiter: SourceLimiter,
    live: Live,
    next_id: AtomicU64,
    /// Set by [`Dataplane::shutdown`]: no listener starts after it.
    stopped: AtomicBool,
    /// The data threads' runtimes, started with the first listener.
    workers: std::sync::OnceLock<Workers>,
}

/// A connection counted open on its listener and overall until dropped.
/// The data threads: a runtime each, and their live connections.
struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    spread: Arc<Spread>,
    /// `nlb_data_thread_connections`, by thread.
    open: Vec<IntGauge>,
}

pub(crate) struct Open {
    dp: Arc<Dataplane>,
    listener: Arc<ListenerShared>,
    id: u64,
    /// Counted on the data thread that serves it.
    placed: Placed,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.dp.live.leave(self.id);
        self.listener.open.fetch_sub(1, Ordering::Relaxed);
        self.listener.active.dec();
        self.dp.open.fetch_sub(1, Ordering::Relaxed);
        self.dp.metrics.open.dec();
        if let Some(w) = self.dp.workers.get() {
            w.open[self.placed.thread()].dec();
        }
        if self.dp.draining.load(Ordering::Relaxed) > 0 {
            self.dp.closed.notify_waiters();
        }
    }
}

/// Why a listener could not start.
#[derive(Debug, thiserror::Error)]
#[error("listener {name:?}: cannot listen on {bind}: {source}")]
pub struct BindError {
    pub name: String,
    pub bind: String,
    pub source: std::io::Error,
}

impl Dataplane {
    pub fn new(
        router: Arc<Router>,
        settings: DataplaneConfig,
        registry: &prometheus::Registry,
    ) -> prometheus::Result<Arc<Self>> {
        Ok(Arc::new(Dataplane {
            router,
            settings: ArcSwap::from_pointee(settings),
            listeners: Mutex::default(),
            metrics: DataplaneMetrics::new(registry)?,
            open: AtomicUsize::new(0),
            sniffing: AtomicUsize::new(0),
            draining: AtomicUsize::new(0),
            closed: Notify::new(),
            limiter: SourceLimiter::default(),
            live: Live::default(),
            next_id: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            workers: std::sync::OnceLock::new(),
        }))
    }

    /// The data threads (started on first use; callers hold the listeners
    /// lock, so they start once).
    fn workers(&self) -> std::io::Result<&Workers> {
        if let Some(w) = self.workers.get() {
            return Ok(w);
        }
        let n = match self.settings().threads {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n as usize,
        };
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            std::thread::Builder::new()
                .name(format!("dataplane-{i}"))
                .spawn(move || runtime.block_on(shared_types::data_thread::keep_a_timer_due()))?;
        }
        let open = (0..n)
            .map(|i| self.metrics.threads.with_label_values(&[&i.to_string()]))
            .collect();
        Ok(self.workers.get_or_init(|| Workers {
            spread: Spread::new(handles.len()),
            handles,
            open,
        }))
    }

    pub fn settings(&self) -> DataplaneConfig {
        **self.settings.load()
    }

    /// Connections open over all listeners.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Makes the running listeners match `specs` (validated) and takes the
    /// new settings. A listener keeps its socket and connections unless
    /// its address changed; its other settings change in place. A moved
    /// listener binds the new address first and keeps the old one if that
    /// fails; a removed one stops accepting and its connections drain.
    /// Returns the listeners that could not bind (the rest apply).
    pub fn apply(
        self: &Arc<Self>,
        specs: &[ListenerConfig],
        settings: &DataplaneConfig,
    ) -> Vec<BindError> {
        self.settings.store(Arc::new(*settings));
        let mut listeners = self.listeners.lock();
        if self.stopped.load(Ordering::Relaxed) {
            return Vec::new();
        }
        let drain = Duration::from_secs(settings.drain_timeout_seconds);
        let mut errors = Vec::new();
        for spec in specs {
            if let Some(l) = listeners.get_mut(&spec.name) {
                if l.spec.bind == spec.bind {
                    l.shared.settings.store(Arc::new(listener_settings(spec)));
                    l.shared
                        .max_connections
                        .store(spec.max_connections, Ordering::Relaxed);
                    l.spec = spec.clone();
                    continue;
                }
            }
            match self.start_listener(spec) {
                Ok(new) => {
                    tracing::info!(
                        listener = %spec.name,
                        bind = %new.shared.local,
                        protocol = %spec.protocol,
                        "listener started"
                    );
                    if let Some(old) = listeners.insert(spec.name.clone(), new) {
                        self.retire(old, drain);
                    }
                }
                Err(e) => {
                    self.metrics
                        .listener_errors
                        .with_label_values(&[spec.name.as_str()])
                        .inc();
                    tracing::error!(error = %e, "listener not started; the one in force (if any) stays");
                    errors.push(e);
                }
            }
        }
        let gone: Vec<String> = listeners
            .keys()
            .filter(|name| !specs.iter().any(|s| &s.name == *name))
            .cloned()
            .collect();
        for name in gone {
            if let Some(l) = listeners.remove(&name) {
                self.retire(l, drain);
            }
        }
        errors
    }

    fn start_listener(self: &Arc<Self>, spec: &ListenerConfig) -> Result<Listener, BindError> {
        let err = |source| BindError {
            name: spec.name.clone(),
            bind: spec.bind.clone(),
            source,
        };
        let invalid = |m: String| err(std::io::Error::new(std::io::ErrorKind::InvalidInput, m));
        let addr: SocketAddr = spec
            .bind
            .parse()
            .map_err(|_| invalid("not an ip:port address".into()))?;
        crate::config::listener_protocol(&spec.protocol).map_err(invalid)?;
        let workers = self.workers().map_err(err)?;
        let socket = bind(addr, self.settings().tcp_keepalive_seconds).map_err(err)?;
        let local = socket.local_addr().map_err(err)?;
        let label = [spec.name.as_str()];
        let shared = Arc::new(ListenerShared {
            name: spec.name.clone(),
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            local,
            settings: ArcSwap::from_pointee(listener_settings(spec)),
            max_connections: AtomicU32::new(spec.max_connections),
            open: AtomicUsize::new(0),
            active: self.metrics.active.with_label_values(&label),
            bytes_up: self
                .metrics
                .bytes
                .with_label_values(&[spec.name.as_str(), "upstream"]),
            bytes_down: self
                .metrics
                .bytes
                .with_label_values(&[spec.name.as_str(), "downstream"]),
            forwarded: Default::default(),
        });
        let (stop_accept, stopping) = watch::channel(false);
        let mut accepting = Vec::with_capacity(workers.handles.len());
        for (thread, worker) in workers.handles.iter().enumerate() {
            let socket = socket.try_clone().map_err(err)?;
            accepting.push(worker.spawn(accept_loop(
                self.clone(),
                (shared.clone(), thread),
                socket,
                stopping.clone(),
            )));
        }
        Ok(Listener {
            spec: spec.clone(),
            shared,
            stop_accept,
            accepting,
        })
    }

    /// Stops a listener accepting (the connections already queued on its
    /// socket are still taken); its connections finish until `drain`, then
    /// are closed.
    fn retire(self: &Arc<Self>, l: Listener, drain: Duration) {
        let _ = l.stop_accept.send(true);
        tracing::info!(
            listener = %l.spec.name,
            open = l.shared.open_connections(),
            "listener stopped; its connections drain"
        );
        let shared = l.shared;
        let accepting = l.accepting;
        let dp = self.clone();
        tokio::spawn(async move {
            for a in accepting {
                let _ = a.await;
            }
            if !dp
                .wait_closed(drain, || shared.open_connections() == 0)
                .await
            {
                dp.live.abort(Some(shared.id));
            }
        });
    }

    /// Waits until `done()` or `drain` has passed; true when done.
    async fn wait_closed(&self, drain: Duration, done: impl Fn() -> bool) -> bool {
        self.draining.fetch_add(1, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + drain;
        let finished = loop {
            let closed = self.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if done() {
                break true;
            }
            if tokio::time::timeout_at(deadline, closed).await.is_err() {
                break done();
            }
        };
        self.draining.fetch_sub(1, Ordering::Relaxed);
        finished
    }

    /// Shutdown: every listener stops accepting (and no new one starts);
    /// open connections finish until `drain`, then the rest are closed.
    /// Returns how many were cut.
    pub async fn shutdown(&self, drain: Duration) -> usize {
        let accepting: Vec<JoinHandle<()>> = {
            let mut listeners = self.listeners.lock();
            self.stopped.store(true, Ordering::Relaxed);
            std::mem::take(&mut *listeners)
                .into_values()
                .flat_map(|l| {
                    let _ = l.stop_accept.send(true);
                    l.accepting
                })
                .collect()
        };
        for a in accepting {
            let _ = a.await;
        }
        if self
            .wait_closed(drain, || self.open_connections() == 0)
            .await
        {
            return 0;
        }
        let left = self.open_connections();
        self.live.abort(None);
        self.wait_closed(Duration::from_secs(2), || self.open_connections() == 0)
            .await;
        left
    }
}

fn listener_settings(spec: &ListenerConfig) -> ListenerSettings {
    ListenerSettings {
        protocol: crate::config::listener_protocol(&spec.protocol).unwrap_or(None),
        proxy_protocol: spec.proxy_protocol,
        trusted: spec
            .trusted_proxies
            .iter()
            .filter_map(|c| Cidr::parse(c).ok())
            .collect(),
    }
}

/// A listening socket with `SO_REUSEADDR` and `SO_REUSEPORT` (so a
/// listener moved back to an address starts before the old socket has
/// closed), IPv6 sockets IPv6 only, and Nagle off and keepalive on after
/// `keepalive_secs` (0 = off): accepted sockets inherit both, so no
/// connection pays for setting them.
fn bind(addr: SocketAddr, keepalive_secs: u64) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    if keepalive_secs > 0 {
        socket.set_tcp_keepalive(
            &socket2::TcpKeepalive::new().with_time(Duration::from_secs(keepalive_secs)),
        )?;
    }
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Accepts on one data thread (`thread`) until told to stop.
async fn accept_loop(
    dp: Arc<Dataplane>,
    (listener, thread): (Arc<ListenerShared>, usize),
    socket: std::net::TcpListener,
    mut stop: watch::Receiver<bool>,
) {
    let socket = match Acceptor::new(socket) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(listener = %listener.name, error = %e, "data thread cannot use the listener");
            return;
        }
    };
    // One wait for the stop signal across all accepts (a new one per
    // accept cost a watch poll and its waker registration each time).
    let stopped = stop.wait_for(|s| *s);
    tokio::pin!(stopped);
    // The stop signal is polled when there is nothing to accept (before
    // the thread waits), and under a flood that never lets it wait, every
    // `STOP_CHECK` accepts: a poll of it takes the lock on its waiters, a
    // few hundred instructions, which every accept paid when it came first.
    const STOP_CHECK: u32 = 64;
    let mut unchecked = 0;
    loop {
        let accepted = tokio::select! {
            biased;
            r = socket.accept() => r,
            _ = &mut stopped => break,
        };
        unchecked += 1;
        let stop_now = unchecked >= STOP_CHECK && {
            unchecked = 0;
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            std::future::Future::poll(stopped.as_mut(), &mut cx).is_ready()
        };
        match accepted {
            Ok((stream, peer)) => admit(&dp, (&listener, thread), stream, peer),
            Err(e) => {
                dp.metrics
                    .listener_errors
                    .with_label_values(&[listener.name.as_str()])
                    .inc();
                // Out of file descriptors or memory: back off rather than
                // spin. Anything else (a connection reset while queued) is
                // the client's and passes.
                const ENFILE: i32 = 23;
                const EMFILE: i32 = 24;
                const ENOBUFS: i32 = 105;
                const ENOMEM: i32 = 12;
                let scarce = matches!(e.raw_os_error(), Some(ENFILE | EMFILE | ENOBUFS | ENOMEM));
                tracing::warn!(listener = %listener.name, error = %e, "accept failed");
                if scarce {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        if stop_now {
            break;
        }
    }
    // Connections the kernel already completed are served, not reset.
    while let Some((stream, peer)) = socket.accept_queued() {
        admit(&dp, (&listener, thread), stream, peer);
    }
    tracing::debug!(listener = %listener.name, "stopped accepting");
}

/// Applies the caps to a connection accepted on data thread `thread` and
/// starts serving it: on that thread, or on another that holds clearly
/// fewer connections (see [`shared_types::spread`]). The socket is on no
/// reactor yet: the thread that serves it registers it, once.
fn admit(
    dp: &Arc<Dataplane>,
    (listener, thread): (&Arc<ListenerShared>, usize),
    stream: std::net::TcpStream,
    peer: SocketAddr,
) {
    let rejected = |reason: &str| {
        dp.metrics
            .rejected
            .with_label_values(&[listener.name.as_str(), reason])
            .inc();
    };
    let settings = dp.settings.load();
    if dp.open.load(Ordering::Relaxed) >= settings.max_connections as usize {
        rejected("global_limit");
        return;
    }
    let max = listener.max_connections.load(Ordering::Relaxed);
    if max > 0 && listener.open.load(Ordering::Relaxed) >= max as usize {
        rejected("listener_limit");
        return;
    }
    // Behind a PROXY v2 sender, the source is known after the header.
    if !listener.settings.load().proxy_protocol
        && !dp.limiter.admit(
            peer.ip(),
            settings.source_rate_per_second,
            settings.source_burst,
        )
    {
        rejected("rate_limited");
        return;
    }
    let Some(workers) = dp.workers.get() else {
        // Accept loops run on the data threads, so they exist.
        return;
    };
    let placed = workers.spread.place(thread);
    let to = placed.thread();
    dp.open.fetch_add(1, Ordering::Relaxed);
    dp.metrics.open.inc();
    listener.open.fetch_add(1, Ordering::Relaxed);
    listener.active.inc();
    workers.open[to].inc();
    let id = dp.next_id.fetch_add(1, Ordering::Relaxed);
    let open = Open {
        dp: dp.clone(),
        listener: listener.clone(),
        id,
        placed,
    };
    // Boxed: tokio moves a task's future several times while spawning it
    // and on each change of stage; a box moves as one pointer.
    let task = workers.handles[to].spawn(Box::pin(conn::serve(open, stream, peer)));
    dp.live.enter(id, listener.id, task.abort_handle());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_inherit_nagle_off_and_keepalive_from_the_listener() {
        let listener = bind("127.0.0.1:0".parse().unwrap(), 60).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let s = socket2::SockRef::from(&accepted);
        assert!(s.tcp_nodelay().unwrap());
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(60));
    }
}
