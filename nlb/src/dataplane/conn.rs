//! One connection: PROXY v2 header (from a trusted load balancer in front),
//! protocol, route, connect (the next instance on failure), PROXY v2 header
//! to the instance if it asked, the bytes already read, then both ways
//! until done.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use shared_types::proxy_v2::{self, Decoded};
use shared_types::sniff::{Sniffer, Verdict};
use shared_types::time::unix_millis;
use tokio::net::TcpStream;

use super::copy::{self, Flow};
use super::{Dataplane, ListenerShared, Open};
use crate::config::DataplaneConfig;
use crate::routing::{mono_ms, normalize_name, ConnInfo, Detected, Endpoint, RouteError};

/// What happened to a connection, for its access log line.
#[derive(Debug, Default)]
struct Report {
    client: Option<SocketAddr>,
    protocol: Option<Detected>,
    server_name: Option<String>,
    route: Option<String>,
    instance: Option<String>,
    attempts: u32,
    outcome: &'static str,
}

/// Serves one accepted connection until it ends (the drain deadline aborts
/// the task). The socket joins this thread's reactor here.
pub(crate) async fn serve(open: Open, client: std::net::TcpStream, peer: SocketAddr) {
    let (dp, listener) = (&open.dp, &open.listener);
    let client = match TcpStream::from_std(client) {
        Ok(client) => client,
        Err(e) => {
            dp.metrics
                .listener_errors
                .with_label_values(&[listener.name.as_str()])
                .inc();
            tracing::warn!(listener = %listener.name, %peer, error = %e, "connection closed: its data thread could not take it");
            return;
        }
    };
    let settings = dp.settings();
    let started = Instant::now();
    let mut report = Report {
        client: Some(peer),
        outcome: "closed",
        ..Report::default()
    };
    let flow = Flow::default();
    forward(dp, listener, &settings, &client, peer, &mut report, &flow).await;
    let (up, down) = (
        flow.up.load(Ordering::Relaxed),
        flow.down.load(Ordering::Relaxed),
    );
    if up > 0 {
        listener.bytes_up.inc_by(up);
    }
    if down > 0 {
        listener.bytes_down.inc_by(down);
    }
    if settings.access_log {
        tracing::info!(
            target: "access",
            listener = %listener.name,
            client = %report.client.map_or_else(|| "-".to_string(), |c| c.to_string()),
            protocol = report.protocol.map_or("-", family),
            server_name = report.server_name.as_deref().unwrap_or("-"),
            route = report.route.as_deref().unwrap_or("-"),
            instance = report.instance.as_deref().unwrap_or("-"),
            attempts = report.attempts,
            bytes_up = up,
            bytes_down = down,
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            outcome = report.outcome,
        );
    }
}

/// A protocol family as a metric label and log field.
pub fn family(d: Detected) -> &'static str {
    match d {
        Detected::Tls => "tls",
        Detected::Http1 => "http1",
        Detected::Http2 => "http2",
        Detected::Postgres => "postgres",
        Detected::Mysql => "mysql",
        Detected::Mongodb => "mongodb",
        Detected::Redis => "redis",
        Detected::Rtmp => "rtmp",
        Detected::Unknown => "tcp",
    }
}

/// The module label of an endpoint: its module type, or `backend`.
fn module_label(e: &Endpoint) -> &'static str {
    if e.module_type == shared_types::pb::ModuleType::Unspecified {
        "backend"
    } else {
        e.module_type.short_name()
    }
}

async fn forward(
    dp: &Arc<Dataplane>,
    listener: &ListenerShared,
    settings: &DataplaneConfig,
    client: &TcpStream,
    peer: SocketAddr,
    report: &mut Report,
    flow: &Flow,
) {
    let rejected = |reason: &'static str| {
        dp.metrics
            .rejected
            .with_label_values(&[listener.name.as_str(), reason])
            .inc();
    };
    // Nagle off and keepalive on already (inherited from the listening
    // socket).
    let ls = listener.settings.load_full();
    let logged = settings.access_log;
    // Bytes read before forwarding (PROXY header's tail, sniffed bytes):
    // replayed to the instance.
    let mut pending: Vec<u8> = Vec::new();
    let mut client_addr = peer;
    let mut dst = None;
    if ls.proxy_protocol {
        if !ls.trusted.is_empty() && !ls.trusted.iter().any(|c| c.contains(peer.ip())) {
            rejected("untrusted_proxy");
            report.outcome = "untrusted_proxy";
            return;
        }
        let timeout = Duration::from_millis(settings.proxy_header_timeout_ms);
        let header = async {
            read_arrived(client, &mut pending).map_err(|e| e.to_string())?;
            read_proxy_header(client, &mut pending).await
        };
        match tokio::time::timeout(timeout, header).await {
            Ok(Ok(h)) => {
                if let Some(src) = h.source() {
                    client_addr = SocketAddr::new(src.ip().to_canonical(), src.port());
                }
                dst = h.destination();
            }
            Ok(Err(e)) => {
                tracing::debug!(listener = %listener.name, %peer, error = %e, "bad PROXY v2 header");
                rejected("proxy_header");
                report.outcome = "bad_proxy_header";
                return;
            }
            Err(_) => {
                rejected("proxy_header");
                report.outcome = "proxy_header_timeout";
                return;
            }
        }
        report.client = Some(client_addr);
        if !dp.limiter.admit(
            client_addr.ip(),
            settings.source_rate_per_second,
            settings.source_burst,
        ) {
            rejected("rate_limited");
            report.outcome = "rate_limited";
            return;
        }
    }

    let (protocol, server_name) = match ls.protocol {
        Some(p) => (p, None),
        None => match Box::pin(sniff(
            dp,
            listener,
            settings,
            (client, !ls.proxy_protocol),
            &mut pending,
        ))
        .await
        {
            Some(found) => found,
            None => {
                report.outcome = "closed_while_sniffing";
                return;
            }
        },
    };
    report.protocol = Some(protocol);
    if logged {
        report.server_name = server_name.clone();
    }

    // Route and connect, the next instance on failure.
    let snapshot = dp.router.load();
    let info = ConnInfo {
        port: listener.local.port(),
        protocol,
        client: Some(client_addr.ip()),
        server_name: server_name
            .as_deref()
            .map(|n| Cow::Owned(normalize_name(n))),
    };
    let mut tried: Vec<String> = Vec::new();
    let mut connected = None;
    for _ in 0..settings.connect_attempts.max(1) {
        let chosen = if tried.is_empty() {
            snapshot.select(&info, &[])
        } else {
            let excluded: Vec<&str> = tried.iter().map(String::as_str).collect();
            snapshot.select(&info, &excluded)
        };
        let selection = match chosen {
            Ok(s) => s,
            Err(e) => {
                if tried.is_empty() {
                    let (reason, outcome) = match e {
                        RouteError::NoRoute(_) => ("no_route", "no_route"),
                        RouteError::NoServer { .. } => ("no_server", "no_server"),
                    };
                    tracing::debug!(listener = %listener.name, %peer, error = %e, "connection not routed");
                    rejected(reason);
                    report.outcome = outcome;
                }
                break;
            }
        };
        let endpoint = selection.endpoint.clone();
        if logged {
            report.route = Some(selection.route.spec.route_id().to_string());
            report.instance = Some(endpoint.id.clone());
        }
        report.attempts += 1;
        let Some(address) = endpoint.address.as_deref() else {
            tried.push(endpoint.id.clone());
            continue;
        };
        let timeout = Duration::from_millis(settings.connect_timeout_ms);
        let connect = async {
            match endpoint.socket_addr {
                Some(parsed) => TcpStream::connect(parsed).await,
                None => TcpStream::connect(address).await,
            }
        };
        match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(upstream)) => {
                endpoint.counters.connect_succeeded();
                let now = unix_millis(SystemTime::now());
                selection.route.stats.mark_used(now);
                let guard = endpoint.counters.open_connection(now);
                connected = Some((upstream, endpoint, guard));
                break;
            }
            Ok(Err(e)) => {
                tracing::debug!(instance = %endpoint.id, %address, error = %e, "connect failed");
                failed(dp, settings, &endpoint, the_instances(&e));
            }
            Err(_) => {
                tracing::debug!(instance = %endpoint.id, %address, "connect timed out");
                failed(dp, settings, &endpoint, true);
            }
        }
        tried.push(endpoint.id.clone());
    }
    drop(snapshot);
    let Some((upstream, endpoint, _guard)) = connected else {
        if report.attempts > 0 {
            rejected("connect_failed");
            report.outcome = "connect_failed";
        }
        return;
    };
    let _ = upstream.set_nodelay(true);
    keepalive(&upstream, settings);
    listener
        .forwarded(&dp.metrics, protocol, module_label(&endpoint))
        .inc();

    // What the instance sees first: its PROXY v2 header if it asked, then
    // the bytes already read.
    let mut header_len = 0;
    if endpoint.proxy_protocol {
        // The address the client reached (a wildcard listener's own
        // address is no answer).
        let dst = dst.unwrap_or_else(|| client.local_addr().unwrap_or(listener.local));
        let header = proxy_v2::Header::proxy(client_addr, dst);
        match proxy_v2::encode(&header) {
            Ok(mut bytes) => {
                header_len = bytes.len();
                bytes.extend_from_slice(&pending);
                pending = bytes;
            }
            Err(e) => {
                tracing::warn!(instance = %endpoint.id, error = %e, "cannot encode the PROXY v2 header");
                report.outcome = "proxy_header_encode";
                return;
            }
        }
    }
    // The client's own bytes among them (the PROXY header is the NLB's).
    let replayed = pending.len() - header_len;
    if !pending.is_empty() {
        if copy::write_all(&upstream, &pending).await.is_err() {
            // Accepted, then gone before the first bytes: the instance's.
            instance_failed(dp, &endpoint, "reset");
            report.outcome = "reset";
            return;
        }
        flow.up.fetch_add(replayed as u64, Ordering::Relaxed);
    }
    drop(pending);
    let ending = copy::both_ways(
        client,
        &upstream,
        settings.buffer_bytes as usize,
        Duration::from_secs(settings.idle_timeout_seconds),
        flow,
    )
    .await;
    // The instance failed this one when it reset the connection before
    // answering, or ended it (or let it idle out) without answering a client
    // that had sent bytes and had not closed first (a client that gave up
    // is not the instance's failure).
    let (up, down) = (
        flow.up.load(Ordering::Relaxed),
        flow.down.load(Ordering::Relaxed),
    );
    let silent = down == 0 && up > 0;
    let unanswered = silent && (ending.upstream_first || ending.end == copy::End::Idle);
    if ending.upstream_reset && down == 0 {
        instance_failed(dp, &endpoint, "reset");
    } else if unanswered {
        instance_failed(dp, &endpoint, "unanswered");
    }
    report.outcome = ending.end.name();
}

/// A forwarded connection the instance failed: counted for the rollout
/// analysis (per instance) and in `nlb_instance_failures_total`.
fn instance_failed(dp: &Dataplane, endpoint: &Endpoint, kind: &'static str) {
    endpoint.counters.record_instance_failure();
    dp.metrics
        .instance_failures
        .with_label_values(&[module_label(endpoint), kind])
        .inc();
}

/// Whether a connect error is the instance's (refused, unreachable, timed
/// out) rather than this host's (out of descriptors, ports or memory),
/// which must not eject anyone.
fn the_instances(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::ConnectionRefused
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::TimedOut
            | K::HostUnreachable
            | K::NetworkUnreachable
            | K::NotFound
    )
}

/// A connect failure: counted, and when it was the instance's, the
/// endpoint is ejected once it has failed `eject_after_failures` times in
/// a row (a module instance until it heartbeats healthy, a static backend
/// for `eject_seconds`).
fn failed(dp: &Dataplane, settings: &DataplaneConfig, endpoint: &Endpoint, its_fault: bool) {
    let module = module_label(endpoint);
    dp.metrics
        .connect_failures
        .with_label_values(&[module])
        .inc();
    if !its_fault {
        return;
    }
    let until = if endpoint.module_type == shared_types::pb::ModuleType::Unspecified {
        mono_ms() + settings.eject_seconds * 1000
    } else {
        u64::MAX
    };
    if endpoint
        .counters
        .connect_failed(settings.eject_after_failures, until)
    {
        dp.metrics.ejections.with_label_values(&[module]).inc();
        tracing::warn!(
            instance = %endpoint.id,
            failures = settings.eject_after_failures,
            "ejected after consecutive connect failures"
        );
    }
}

/// TCP keepalive on, after the configured idle time.
fn keepalive(s: &TcpStream, settings: &DataplaneConfig) {
    if settings.tcp_keepalive_seconds > 0 {
        let ka = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(settings.tcp_keepalive_seconds));
        let _ = socket2::SockRef::from(s).set_tcp_keepalive(&ka);
    }
}

/// Reads into `buf` (empty) what the client has sent already, straight
/// from the socket. The data threads register accepted sockets themselves
/// (see [`super::accept`]), and a socket so registered reads as not ready
/// until the reactor's first event: a listener that reads first (a PROXY
/// header, or sniffing) would wait a turn of the reactor for bytes that are
/// usually there. Nothing there yet, or the end: nothing is read, and the
/// reads that follow wait, or find the end, as they would have. A failed
/// read is returned, as theirs would be. At most [`FIRST_READ`] bytes: a
/// longer first message (a large TLS ClientHello) has its rest read once
/// the reactor has seen it.
fn read_arrived(s: &TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    use std::io::Read;
    buf.resize(FIRST_READ, 0);
    let read = (&*socket2::SockRef::from(s)).read(buf);
    buf.truncate(*read.as_ref().unwrap_or(&0));
    match read {
        Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => Err(e),
        _ => Ok(()),
    }
}

/// How much [`read_arrived`] reads: a PROXY header, or the first bytes of
/// a request, whole (the buffer is zeroed first, so not more).
const FIRST_READ: usize = 1024;

/// Reads from `s` into `buf` (appending) once bytes are there; `Ok(0)` at
/// the end of the stream.
async fn read_more(s: &TcpStream, buf: &mut Vec<u8>, at_most: usize) -> std::io::Result<usize> {
    // Straight into the vector's room: no buffer lives in the future.
    buf.reserve(at_most.clamp(1, 4096));
    loop {
        s.readable().await?;
        match s.try_read_buf(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Reads one PROXY v2 header; the bytes after it stay in `pending`.
async fn read_proxy_header(
    s: &TcpStream,
    pending: &mut Vec<u8>,
) -> Result<proxy_v2::Header, String> {
    loop {
        match proxy_v2::decode(pending, proxy_v2::DEFAULT_MAX_LEN) {
            Ok(Decoded::Complete { header, len }) => {
                pending.drain(..len);
                return Ok(header);
            }
            Ok(Decoded::Incomplete { needed_total }) => {
                let n = read_more(s, pending, needed_total - pending.len())
                    .await
                    .map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err(format!(
                        "the peer closed after {} byte(s) of the header",
                        pending.len()
                    ));
                }
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Finds the protocol from the first bytes, within the byte budget and the
/// sniff timeout (`unread`: nothing was read from `client` yet). `None`:
/// the client closed (or failed) first. On timeout or no match the
/// connection goes on as plain TCP.
async fn sniff(
    dp: &Dataplane,
    listener: &ListenerShared,
    settings: &DataplaneConfig,
    (client, unread): (&TcpStream, bool),
    pending: &mut Vec<u8>,
) -> Option<(Detected, Option<String>)> {
    let count = |outcome: &str| {
        dp.metrics
            .sniff
            .with_label_values(&[listener.name.as_str(), outcome])
            .inc();
    };
    // The slowloris cap: connections still being sniffed at once.
    if dp.sniffing.fetch_add(1, Ordering::Relaxed) >= settings.max_sniffing as usize {
        dp.sniffing.fetch_sub(1, Ordering::Relaxed);
        dp.metrics
            .rejected
            .with_label_values(&[listener.name.as_str(), "sniff_limit"])
            .inc();
        return None;
    }
    struct Slot<'a>(&'a std::sync::atomic::AtomicUsize);
    impl Drop for Slot<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::Relaxed);
        }
    }
    let _slot = Slot(&dp.sniffing);
    let budget = settings.sniff_budget_bytes as usize;
    let mut sniffer = Sniffer::with_budget(budget);
    let look = async {
        if unread {
            read_arrived(client, pending)?;
        }
        loop {
            if !pending.is_empty() {
                match sniffer.feed(pending) {
                    Verdict::Match(s) => return Ok(Some(s)),
                    Verdict::NoMatch => return Ok(None),
                    Verdict::NeedMore => {}
                }
            }
            let room = budget.saturating_sub(pending.len()).max(1);
            let n = read_more(client, pending, room).await?;
            if n == 0 {
                // Some bytes, then the end: nothing more will tell, so it
                // is no match (plain TCP), not a lost connection.
                if pending.is_empty() {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
                }
                return Ok(None);
            }
        }
    };
    let timeout = Duration::from_millis(settings.sniff_timeout_ms);
    match tokio::time::timeout(timeout, look).await {
        Ok(Ok(Some(found))) => {
            count(family(found.protocol));
            Some((found.protocol, found.server_name))
        }
        Ok(Ok(None)) => {
            count("no_match");
            Some((Detected::Unknown, None))
        }
        Ok(Err(_)) => {
            count("closed");
            None
        }
        Err(_) => {
            count("timeout");
            Some((Detected::Unknown, None))
        }
    }
}
