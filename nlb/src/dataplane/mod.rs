//! The L4 data plane: listeners accept connections, find each one's
//! protocol (declared, or sniffed from its first bytes), route it with the
//! routing core's current snapshot, connect to an instance (the next one on
//! failure) and copy bytes both ways until either side is done.
//!
//! Listener changes apply by difference: a listener whose settings did not
//! change keeps its socket and connections; a removed one stops accepting
//! and its connections finish until the drain deadline.

pub mod conn;
pub mod copy;
pub mod limit;
pub mod metrics;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use prometheus::IntGauge;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

use crate::config::{DataplaneConfig, ListenerConfig};
use crate::routing::{Cidr, Detected, Router};
use limit::SourceLimiter;
use metrics::DataplaneMetrics;

/// A listener as its connections see it.
pub struct ListenerShared {
    pub name: String,
    pub local: SocketAddr,
    /// `None`: sniffed (`auto`).
    pub protocol: Option<Detected>,
    /// 0 = no limit of its own (changed in place on reload).
    pub max_connections: AtomicU32,
    pub proxy_protocol: bool,
    /// Peers allowed to send a PROXY v2 header; empty = any.
    pub trusted: Vec<Cidr>,
    open: AtomicUsize,
    /// Turns true when this listener's connections must close now.
    kill: watch::Sender<bool>,
    active: IntGauge,
}

impl ListenerShared {
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

struct Listener {
    spec: ListenerConfig,
    shared: Arc<ListenerShared>,
    stop_accept: watch::Sender<bool>,
}

/// The data plane.
pub struct Dataplane {
    router: Arc<Router>,
    settings: ArcSwap<DataplaneConfig>,
    listeners: Mutex<BTreeMap<String, Listener>>,
    pub metrics: DataplaneMetrics,
    open: AtomicUsize,
    sniffing: AtomicUsize,
    closed: Notify,
    limiter: SourceLimiter,
    /// Turns true when every connection must close now (the end of the
    /// shutdown drain).
    kill_all: watch::Sender<bool>,
}

/// A connection counted open on its listener and overall until dropped.
pub(crate) struct Open {
    dp: Arc<Dataplane>,
    listener: Arc<ListenerShared>,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.listener.open.fetch_sub(1, Ordering::Relaxed);
        self.listener.active.dec();
        self.dp.open.fetch_sub(1, Ordering::Relaxed);
        self.dp.metrics.open.dec();
        self.dp.closed.notify_waiters();
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
            closed: Notify::new(),
            limiter: SourceLimiter::default(),
            kill_all: watch::Sender::new(false),
        }))
    }

    pub fn settings(&self) -> Arc<DataplaneConfig> {
        self.settings.load_full()
    }

    /// Connections open over all listeners.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The address each listener is bound to, by name.
    pub fn bound(&self) -> BTreeMap<String, SocketAddr> {
        self.listeners
            .lock()
            .iter()
            .map(|(n, l)| (n.clone(), l.shared.local))
            .collect()
    }

    /// Makes the running listeners match `specs` (validated) and takes the
    /// new settings. Unchanged listeners are untouched; a changed limit is
    /// changed in place; a removed or rebound listener stops accepting and
    /// its connections drain. Returns the listeners that could not bind
    /// (the others apply regardless).
    pub fn apply(
        self: &Arc<Self>,
        specs: &[ListenerConfig],
        settings: &DataplaneConfig,
    ) -> Vec<BindError> {
        self.settings.store(Arc::new(settings.clone()));
        let mut listeners = self.listeners.lock();
        let wanted: BTreeMap<&str, &ListenerConfig> =
            specs.iter().map(|s| (s.name.as_str(), s)).collect();
        // Stop those gone or changed beyond their limit.
        let stale: Vec<String> = listeners
            .iter()
            .filter(|(name, l)| {
                wanted
                    .get(name.as_str())
                    .is_none_or(|w| !same_socket(&l.spec, w))
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(l) = listeners.remove(&name) {
                self.retire(l, Duration::from_secs(settings.drain_timeout_seconds));
            }
        }
        let mut errors = Vec::new();
        for spec in specs {
            if let Some(l) = listeners.get_mut(&spec.name) {
                l.shared
                    .max_connections
                    .store(spec.max_connections, Ordering::Relaxed);
                l.spec = spec.clone();
                continue;
            }
            match self.start_listener(spec) {
                Ok(l) => {
                    tracing::info!(
                        listener = %spec.name,
                        bind = %l.shared.local,
                        protocol = %spec.protocol,
                        "listener started"
                    );
                    listeners.insert(spec.name.clone(), l);
                }
                Err(e) => {
                    self.metrics
                        .listener_errors
                        .with_label_values(&[spec.name.as_str()])
                        .inc();
                    tracing::error!(error = %e, "listener not started");
                    errors.push(e);
                }
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
        let addr: SocketAddr = spec.bind.parse().map_err(|_| {
            err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not an ip:port address",
            ))
        })?;
        let socket = bind(addr).map_err(err)?;
        let local = socket.local_addr().map_err(err)?;
        let protocol = crate::config::listener_protocol(&spec.protocol)
            .map_err(|m| err(std::io::Error::new(std::io::ErrorKind::InvalidInput, m)))?;
        let shared = Arc::new(ListenerShared {
            name: spec.name.clone(),
            local,
            protocol,
            max_connections: AtomicU32::new(spec.max_connections),
            proxy_protocol: spec.proxy_protocol,
            trusted: spec
                .trusted_proxies
                .iter()
                .filter_map(|c| Cidr::parse(c).ok())
                .collect(),
            open: AtomicUsize::new(0),
            kill: watch::Sender::new(false),
            active: self.metrics.active.with_label_values(&[spec.name.as_str()]),
        });
        let (stop_accept, stopping) = watch::channel(false);
        tokio::spawn(accept_loop(self.clone(), shared.clone(), socket, stopping));
        Ok(Listener {
            spec: spec.clone(),
            shared,
            stop_accept,
        })
    }

    /// Stops a listener accepting; its connections finish until `drain`,
    /// then are closed.
    fn retire(self: &Arc<Self>, l: Listener, drain: Duration) {
        let _ = l.stop_accept.send(true);
        tracing::info!(
            listener = %l.spec.name,
            open = l.shared.open_connections(),
            "listener stopped; its connections drain"
        );
        let shared = l.shared;
        let dp = self.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + drain;
            loop {
                let closed = dp.closed.notified();
                if shared.open_connections() == 0 {
                    return;
                }
                if tokio::time::timeout_at(deadline, closed).await.is_err() {
                    break;
                }
            }
            let _ = shared.kill.send(true);
        });
    }

    /// Shutdown: every listener stops accepting; open connections finish
    /// until `drain`, then the rest are closed. Returns how many were cut.
    pub async fn shutdown(&self, drain: Duration) -> usize {
        for l in self.listeners.lock().values() {
            let _ = l.stop_accept.send(true);
        }
        let deadline = tokio::time::Instant::now() + drain;
        loop {
            let closed = self.closed.notified();
            if self.open_connections() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, closed).await.is_err() {
                break;
            }
        }
        let left = self.open_connections();
        let _ = self.kill_all.send(true);
        // Give the closing connections a moment to go.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while self.open_connections() > 0 {
                let closed = self.closed.notified();
                if self.open_connections() == 0 {
                    break;
                }
                closed.await;
            }
        })
        .await;
        left
    }
}

/// Whether two specs can share one socket (only the limit differs).
fn same_socket(a: &ListenerConfig, b: &ListenerConfig) -> bool {
    a.bind == b.bind
        && a.protocol.eq_ignore_ascii_case(&b.protocol)
        && a.proxy_protocol == b.proxy_protocol
        && a.trusted_proxies == b.trusted_proxies
}

/// A listening socket with `SO_REUSEADDR` and `SO_REUSEPORT` (so a
/// listener rebound to the same address starts before the old one has
/// closed), IPv6 sockets IPv6 only.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

async fn accept_loop(
    dp: Arc<Dataplane>,
    listener: Arc<ListenerShared>,
    socket: TcpListener,
    mut stop: watch::Receiver<bool>,
) {
    let rejected = |reason: &str| {
        dp.metrics
            .rejected
            .with_label_values(&[listener.name.as_str(), reason])
            .inc();
    };
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            r = socket.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors (or a transient error): back off
                // rather than spin.
                dp.metrics
                    .listener_errors
                    .with_label_values(&[listener.name.as_str()])
                    .inc();
                tracing::warn!(listener = %listener.name, error = %e, "accept failed; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let settings = dp.settings.load();
        if dp.open.load(Ordering::Relaxed) >= settings.max_connections as usize {
            rejected("global_limit");
            continue;
        }
        let max = listener.max_connections.load(Ordering::Relaxed);
        if max > 0 && listener.open.load(Ordering::Relaxed) >= max as usize {
            rejected("listener_limit");
            continue;
        }
        // Behind a PROXY v2 sender, the source is known after the header.
        if !listener.proxy_protocol
            && !dp.limiter.admit(
                peer.ip(),
                settings.source_rate_per_second,
                settings.source_burst,
            )
        {
            rejected("rate_limited");
            continue;
        }
        dp.open.fetch_add(1, Ordering::Relaxed);
        dp.metrics.open.inc();
        listener.open.fetch_add(1, Ordering::Relaxed);
        listener.active.inc();
        let open = Open {
            dp: dp.clone(),
            listener: listener.clone(),
        };
        tokio::spawn(conn::serve(open, stream, peer));
    }
    tracing::debug!(listener = %listener.name, "stopped accepting");
}
