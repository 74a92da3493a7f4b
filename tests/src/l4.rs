//! The NLB's L4 data plane from outside: a real `nlb` with data-plane
//! listeners on loopback, fake module instances that register themselves
//! over the control API and serve a data port, static backends, and clients
//! that connect from chosen addresses in 127.0.0.0/8.
//!
//! A fake instance answers each connection with one banner line naming it
//! (`switchyard-fake <id>`), so a client knows which instance it reached;
//! then it echoes what it receives and records it, so a test knows the
//! instance got exactly the client's bytes. An HTTP instance answers one
//! HTTP/1.1 request with the banner as the body, for real HTTP clients.
//!
//! Loads are bounded in count, in parallelism and in time ([`run_bounded`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shared_types::pb::{self, nlb_service_client::NlbServiceClient, HealthStatus, ModuleType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::{NlbProcess, Sandbox, CALL_DEADLINE};

/// What every fake instance's first line starts with; the instance id follows.
pub const BANNER: &str = "switchyard-fake ";

/// How often fake instances heartbeat (their lease is 3 × 5 s).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
const HEALTH_INTERVAL_SECONDS: i32 = 5;

/// The most one fake connection or one client reads (a bound, not a limit
/// any test reaches).
const MAX_READ: usize = 1 << 20;

// ---------------------------------------------------------------------------
// The NLB

/// The data-plane listeners of a started NLB, by name.
#[derive(Debug, Clone, Default)]
pub struct Listeners(BTreeMap<String, SocketAddr>);

impl Listeners {
    /// The address of listener `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        *self
            .0
            .get(name)
            .unwrap_or_else(|| panic!("no listener {name:?} in {:?}", self.0))
    }

    /// The port of listener `name` (what routes name as `destination_port`).
    pub fn port(&self, name: &str) -> u16 {
        self.addr(name).port()
    }
}

/// A running NLB with data-plane listeners.
pub struct L4Nlb {
    pub nlb: NlbProcess,
    pub listeners: Listeners,
}

impl std::ops::Deref for L4Nlb {
    type Target = NlbProcess;
    fn deref(&self) -> &NlbProcess {
        &self.nlb
    }
}

impl std::ops::DerefMut for L4Nlb {
    fn deref_mut(&mut self) -> &mut NlbProcess {
        &mut self.nlb
    }
}

/// Starts `nlb` with the listeners `(name, protocol)` on free loopback
/// ports, and the other sections `sections` writes (YAML text, given the
/// listeners' addresses: routes name their ports). A listener needs a fixed
/// port, so ports are picked first; if another process takes one before the
/// NLB binds it, the NLB is started again on new ones.
pub async fn start_nlb(
    sb: &Sandbox,
    listeners: &[(&str, &str)],
    sections: impl Fn(&Listeners) -> String,
) -> L4Nlb {
    let mut last = String::new();
    for _ in 0..5 {
        let held: Vec<std::net::TcpListener> = listeners
            .iter()
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
            .collect();
        let picked = Listeners(
            listeners
                .iter()
                .zip(&held)
                .map(|((name, _), l)| (name.to_string(), l.local_addr().expect("local addr")))
                .collect(),
        );
        drop(held);
        let mut yaml = String::from("listeners:\n");
        for (name, protocol) in listeners {
            yaml.push_str(&format!(
                "  - {{name: {name}, bind: \"{}\", protocol: {protocol}}}\n",
                picked.addr(name)
            ));
        }
        yaml.push_str(&sections(&picked));
        sb.write_config(&yaml);
        let mut nlb = sb.spawn(&crate::Launch::default());
        match nlb.wait_ready().await {
            Ok(()) => {
                return L4Nlb {
                    nlb,
                    listeners: picked,
                }
            }
            Err(e) if e.contains("cannot listen on") && e.contains("in use") => last = e,
            Err(e) => panic!("{e}\nconfig:\n{yaml}"),
        }
    }
    panic!("could not start nlb on free ports: {last}");
}

// ---------------------------------------------------------------------------
// Data servers: what fake instances and static backends run

/// How a data server answers a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// The banner line at once (the server speaks first), then an echo of
    /// every byte until the client half-closes; then it closes.
    Echo,
    /// Reads one HTTP/1.x request head and answers `200` with the banner
    /// line as the body, then closes.
    Http,
    /// Reads what the client sends first, then closes without answering a
    /// byte: an instance that fails every connection (the NLB counts it).
    Unanswered,
}

#[derive(Default)]
struct ServerState {
    accepted: AtomicUsize,
    open: AtomicUsize,
    /// What each finished connection received, in the order they finished.
    received: Mutex<Vec<Vec<u8>>>,
}

/// A TCP server on a loopback port; it stops accepting when closed or
/// dropped (connections already accepted go on).
pub struct DataServer {
    pub name: String,
    pub addr: SocketAddr,
    state: Arc<ServerState>,
    task: Option<JoinHandle<()>>,
}

impl Drop for DataServer {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl DataServer {
    /// Starts a server called `name` on a free loopback port.
    pub async fn start(name: &str, behaviour: Behaviour) -> DataServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a data server");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(ServerState::default());
        let (st, banner) = (state.clone(), format!("{BANNER}{name}\n"));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                st.accepted.fetch_add(1, Ordering::SeqCst);
                st.open.fetch_add(1, Ordering::SeqCst);
                let (st, banner) = (st.clone(), banner.clone());
                tokio::spawn(async move {
                    let got = match behaviour {
                        Behaviour::Echo => serve_echo(stream, &banner).await,
                        Behaviour::Http => serve_http(stream, &banner).await,
                        Behaviour::Unanswered => serve_unanswered(stream).await,
                    };
                    st.received.lock().expect("lock").push(got);
                    st.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        DataServer {
            name: name.to_string(),
            addr,
            state,
            task: Some(task),
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }

    /// What each finished connection received, in the order they finished.
    pub fn received(&self) -> Vec<Vec<u8>> {
        self.state.received.lock().expect("lock").clone()
    }

    /// Stops accepting and closes the listening socket (new connections are
    /// refused); returns once it is closed.
    pub async fn close(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

async fn serve_echo(mut s: TcpStream, banner: &str) -> Vec<u8> {
    let mut got = Vec::new();
    if s.write_all(banner.as_bytes()).await.is_err() {
        return got;
    }
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if got.len() < MAX_READ {
                    got.extend_from_slice(&buf[..n]);
                }
                if s.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = s.shutdown().await;
    got
}

async fn serve_unanswered(mut s: TcpStream) -> Vec<u8> {
    let mut buf = vec![0u8; 16 * 1024];
    match tokio::time::timeout(CALL_DEADLINE, s.read(&mut buf)).await {
        Ok(Ok(n)) => buf[..n].to_vec(),
        _ => Vec::new(),
    }
}

async fn serve_http(mut s: TcpStream, banner: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") && got.len() < MAX_READ {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let reply = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{banner}",
        banner.len()
    );
    let _ = s.write_all(reply.as_bytes()).await;
    let _ = s.shutdown().await;
    got
}

// ---------------------------------------------------------------------------
// Fake module instances

/// A route announced by a module: `protocol` on listener port `port`, for
/// the server name `name` (TLS SNI or HTTP Host; empty = any).
pub fn route(route_id: &str, protocol: pb::Protocol, port: u16, name: &str) -> pb::Route {
    pb::Route {
        route_id: route_id.into(),
        protocol: protocol as i32,
        destination_port: i32::from(port),
        destination_pattern: name.into(),
        ..Default::default()
    }
}

/// What a fake instance registers as.
#[derive(Debug, Clone)]
pub struct ModuleSpec {
    pub id: String,
    pub module_type: ModuleType,
    pub version: String,
    pub routes: Vec<pb::Route>,
    pub behaviour: Behaviour,
    /// Its `ModuleService` accepts connections and never answers.
    pub silent_module_service: bool,
}

impl ModuleSpec {
    /// An echoing instance, version `1.0`.
    pub fn new(id: &str, module_type: ModuleType, routes: Vec<pb::Route>) -> Self {
        ModuleSpec {
            id: id.into(),
            module_type,
            version: "1.0".into(),
            routes,
            behaviour: Behaviour::Echo,
            silent_module_service: false,
        }
    }

    /// Its `ModuleService` accepts connections and never answers: every
    /// call to it runs into the caller's deadline.
    pub fn silent_module_service(mut self) -> Self {
        self.silent_module_service = true;
        self
    }

    pub fn version(mut self, v: &str) -> Self {
        self.version = v.into();
        self
    }

    pub fn behaviour(mut self, b: Behaviour) -> Self {
        self.behaviour = b;
        self
    }
}

/// A registered fake instance: its data server, a ModuleService that
/// answers health checks, and a heartbeat every second. Stops heartbeating
/// and serving when dropped.
pub struct FakeModule {
    pub id: String,
    pub version: String,
    pub registration_id: String,
    pub server: DataServer,
    heartbeat: JoinHandle<()>,
}

impl Drop for FakeModule {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

impl std::ops::Deref for FakeModule {
    type Target = DataServer;
    fn deref(&self) -> &DataServer {
        &self.server
    }
}

/// Starts a fake instance and registers it with `nlb` as `spec` says
/// (`metadata["data_address"]` = its data server, the protocols of its
/// routes as `capabilities["protocols"]`, its routes as `initial_routes`).
pub async fn register(nlb: &NlbProcess, spec: ModuleSpec) -> FakeModule {
    let server = DataServer::start(&spec.id, spec.behaviour).await;
    let control = if spec.silent_module_service {
        serve_silence().await
    } else {
        crate::control::serve_fake_module().await
    };
    let mut protocols: Vec<&str> = spec
        .routes
        .iter()
        .filter_map(|r| pb::Protocol::from_wire(r.protocol).map(|p| p.short_name()))
        .collect();
    protocols.sort_unstable();
    protocols.dedup();
    let mut client = nlb.client().await;
    let resp = client
        .register_module(pb::RegisterModuleRequest {
            instance: Some(pb::ModuleInstance {
                instance_id: spec.id.clone(),
                module_type: spec.module_type as i32,
                address: control,
                health_status: HealthStatus::Healthy as i32,
                metadata: [("data_address".to_string(), server.addr.to_string())].into(),
                version: spec.version.clone(),
                ..Default::default()
            }),
            initial_routes: spec.routes.clone(),
            health_config: Some(pb::HealthCheckConfig {
                interval_seconds: HEALTH_INTERVAL_SECONDS,
                ..Default::default()
            }),
            capabilities: [("protocols".to_string(), protocols.join(","))].into(),
        })
        .await
        .unwrap_or_else(|s| panic!("register {}: {s:?}; stderr:\n{}", spec.id, nlb.stderr()))
        .into_inner();
    assert!(resp.success, "register {}: {resp:?}", spec.id);
    let heartbeat = tokio::spawn(heartbeats(
        client,
        spec.id.clone(),
        resp.registration_id.clone(),
    ));
    FakeModule {
        id: spec.id,
        version: spec.version,
        registration_id: resp.registration_id,
        server,
        heartbeat,
    }
}

/// A listener on a loopback port that accepts connections and holds them
/// without a byte (for as long as the test's runtime runs); its address.
async fn serve_silence() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr").to_string();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    addr
}

async fn heartbeats(mut client: NlbServiceClient<Channel>, id: String, registration_id: String) {
    loop {
        tokio::time::sleep(HEARTBEAT_EVERY).await;
        let _ = client
            .heartbeat(pb::HeartbeatRequest {
                instance_id: id.clone(),
                registration_id: registration_id.clone(),
                status: HealthStatus::Healthy as i32,
                ..Default::default()
            })
            .await;
    }
}

// ---------------------------------------------------------------------------
// Clients

/// The `i`-th of many distinct client addresses in 127.0.0.0/8 (never
/// 127.0.0.1): 127.a.b.c with c in 1..=250.
pub fn source(i: usize) -> Ipv4Addr {
    let i = u32::try_from(i).expect("a small index");
    let a = 1 + i / 62_500;
    assert!(a < 255, "source index {i} is out of 127.0.0.0/8");
    Ipv4Addr::new(127, a as u8, ((i / 250) % 250) as u8, (1 + i % 250) as u8)
}

/// A TCP connection to `to` from `src` (the socket is bound to `src:0`
/// before connecting), with a deadline.
pub async fn connect_from(src: Ipv4Addr, to: SocketAddr) -> Result<TcpStream, String> {
    let connect = async {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(src.into(), 0))?;
        socket.connect(to).await
    };
    tokio::time::timeout(CALL_DEADLINE, connect)
        .await
        .map_err(|_| format!("connect {src} -> {to}: no answer within {CALL_DEADLINE:?}"))?
        .map_err(|e| format!("connect {src} -> {to}: {e}"))
}

/// What one exchange with a fake instance gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    /// The id the banner named.
    pub instance: String,
    /// Every byte after the banner line (the echo).
    pub echoed: Vec<u8>,
}

/// Reads until the end of the stream (bounded), with a deadline.
async fn read_all(s: &mut TcpStream, what: &str) -> Result<Vec<u8>, String> {
    let mut got = Vec::new();
    let read = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 || got.len() >= MAX_READ {
                return Ok::<_, std::io::Error>(());
            }
            got.extend_from_slice(&buf[..n]);
        }
    };
    match tokio::time::timeout(CALL_DEADLINE, read).await {
        Err(_) => Err(format!(
            "{what}: no end of stream within {CALL_DEADLINE:?} (got {:?})",
            String::from_utf8_lossy(&got)
        )),
        Ok(Err(e)) => Err(format!(
            "{what}: {e} after {:?}",
            String::from_utf8_lossy(&got)
        )),
        Ok(Ok(())) => Ok(got),
    }
}

/// Splits a fake instance's answer into the instance its banner names and
/// the rest.
fn split_banner(raw: &[u8], what: &str) -> Result<Exchange, String> {
    let nl = raw.iter().position(|b| *b == b'\n').ok_or_else(|| {
        format!(
            "{what}: no banner line in {:?} (closed before an instance answered?)",
            String::from_utf8_lossy(raw)
        )
    })?;
    let line = String::from_utf8_lossy(&raw[..nl]);
    let instance = line
        .strip_prefix(BANNER)
        .ok_or_else(|| format!("{what}: {line:?} is not a fake instance's banner"))?;
    Ok(Exchange {
        instance: instance.to_string(),
        echoed: raw[nl + 1..].to_vec(),
    })
}

/// Connects to `to` from `src`, sends `chunks` (pausing `pause` between
/// them), half-closes, and reads everything back: the banner of the
/// instance reached and its echo. Errs when the client sees a refusal, a
/// reset, or no answer.
pub async fn exchange(
    src: Ipv4Addr,
    to: SocketAddr,
    chunks: &[&[u8]],
    pause: Duration,
) -> Result<Exchange, String> {
    let what = format!("{src} -> {to}");
    let mut s = connect_from(src, to).await?;
    for (i, chunk) in chunks.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(pause).await;
        }
        s.write_all(chunk)
            .await
            .map_err(|e| format!("{what}: write: {e}"))?;
    }
    s.shutdown()
        .await
        .map_err(|e| format!("{what}: half-close: {e}"))?;
    let raw = read_all(&mut s, &what).await?;
    split_banner(&raw, &what)
}

/// Connects from `src`, sends nothing, and reads the banner line: the id of
/// the instance reached. The connection stays open in the returned stream.
pub async fn hold(src: Ipv4Addr, to: SocketAddr) -> Result<(TcpStream, String), String> {
    let what = format!("{src} -> {to}");
    let mut s = connect_from(src, to).await?;
    let mut line = Vec::new();
    let read = async {
        let mut byte = [0u8; 1];
        while line.len() < 1024 {
            if s.read(&mut byte).await? == 0 {
                break;
            }
            if byte[0] == b'\n' {
                line.push(b'\n');
                break;
            }
            line.push(byte[0]);
        }
        Ok::<_, std::io::Error>(())
    };
    match tokio::time::timeout(CALL_DEADLINE, read).await {
        Err(_) => return Err(format!("{what}: no banner within {CALL_DEADLINE:?}")),
        Ok(Err(e)) => return Err(format!("{what}: {e}")),
        Ok(Ok(())) => {}
    }
    let ex = split_banner(&line, &what)?;
    Ok((s, ex.instance))
}

/// [`hold`], then closes: the id of the instance reached from `src`.
pub async fn banner_from(src: Ipv4Addr, to: SocketAddr) -> Result<String, String> {
    hold(src, to).await.map(|(_, id)| id)
}

/// Runs `f(0..count)`, at most `parallel` at once, and returns the results
/// in index order; panics if they take longer than `deadline` in all.
pub async fn run_bounded<T, F, Fut>(
    count: usize,
    parallel: usize,
    deadline: Duration,
    f: F,
) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = T> + Send,
{
    let f = Arc::new(f);
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..parallel.clamp(1, count.max(1)) {
        let (f, next) = (f.clone(), next.clone());
        workers.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return out;
                }
                out.push((i, f(i).await));
            }
        });
    }
    let all = async {
        let mut out = Vec::with_capacity(count);
        while let Some(r) = workers.join_next().await {
            out.extend(r.expect("a load worker panicked"));
        }
        out
    };
    let mut out = tokio::time::timeout(deadline, all)
        .await
        .unwrap_or_else(|_| panic!("{count} connections did not finish within {deadline:?}"));
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, t)| t).collect()
}

/// Counts results by instance id; the failures are returned as they are.
pub fn tally(results: &[Result<String, String>]) -> (BTreeMap<String, usize>, Vec<String>) {
    let mut by_instance = BTreeMap::new();
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok(id) => *by_instance.entry(id.clone()).or_insert(0) += 1,
            Err(e) => failures.push(e.clone()),
        }
    }
    (by_instance, failures)
}

// ---------------------------------------------------------------------------
// Observing the NLB

/// The sum of the samples of metric `name` whose labels include every pair
/// of `labels` (any order, other labels ignored); 0 when there is none.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(parse_sample)
        .filter(|(n, ls, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| ls.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

/// One Prometheus sample: name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// Parses one Prometheus text sample line.
fn parse_sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let mut labels = Vec::new();
    let value_text = if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices();
        let mut key = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '}' => {
                    end = Some(i + 1);
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    // A quoted value with backslash escapes.
                    let (_, q) = chars.next()?;
                    if q != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        let (_, c) = chars.next()?;
                        match c {
                            '"' => break,
                            '\\' => {
                                let (_, e) = chars.next()?;
                                value.push(if e == 'n' { '\n' } else { e });
                            }
                            c => value.push(c),
                        }
                    }
                    labels.push((std::mem::take(&mut key), value));
                }
                c => key.push(c),
            }
        }
        &body[end?..]
    } else {
        rest
    };
    let value = value_text.split_whitespace().next()?.parse().ok()?;
    Some((name.to_string(), labels, value))
}

/// `/metrics` on the admin port.
pub async fn metrics(nlb: &NlbProcess) -> String {
    nlb.get("/metrics").await.body
}

/// Polls `/metrics` until `check` holds for it; panics at the deadline with
/// `what`, the last metrics and the logs.
pub async fn metrics_until(nlb: &NlbProcess, what: &str, check: impl Fn(&str) -> bool) -> String {
    let until = tokio::time::Instant::now() + crate::CHANGE_DEADLINE;
    loop {
        let text = metrics(nlb).await;
        if check(&text) {
            return text;
        }
        if tokio::time::Instant::now() >= until {
            let ours: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("nlb_") && !l.starts_with("nlb_grpc"))
                .collect();
            panic!(
                "{what}: not seen within {:?}; metrics:\n{}\nstderr:\n{}",
                crate::CHANGE_DEADLINE,
                ours.join("\n"),
                nlb.stderr()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GetLoadDistribution`: active connections by instance id.
pub async fn active_by_instance(nlb: &NlbProcess) -> BTreeMap<String, i32> {
    nlb.client()
        .await
        .get_load_distribution(pb::GetLoadDistributionRequest::default())
        .await
        .unwrap_or_else(|s| panic!("GetLoadDistribution: {s:?}"))
        .into_inner()
        .distribution
        .into_iter()
        .map(|(id, l)| (id, l.active_connections))
        .collect()
}

/// `UpdateNLBConfig` of one section (YAML text); panics unless it applied.
pub async fn update_section(nlb: &NlbProcess, section: &str, yaml: &str) {
    let resp = nlb
        .client()
        .await
        .update_nlb_config(pb::UpdateNlbConfigRequest {
            config: Some(pb::ConfigUpdate {
                config_type: section.into(),
                config_data: yaml.as_bytes().to_vec(),
                ..Default::default()
            }),
            validate_only: false,
            restart_required: false,
        })
        .await
        .unwrap_or_else(|s| panic!("UpdateNLBConfig {section}: {s:?}"))
        .into_inner();
    assert!(resp.success, "UpdateNLBConfig {section}: {resp:?}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_parse_whatever_the_label_order() {
        let text = "# HELP x y\n\
                    nlb_sniff_total{listener=\"a\",outcome=\"tls\"} 3\n\
                    nlb_sniff_total{outcome=\"no_match\",listener=\"a\"} 2\n\
                    nlb_sniff_total{listener=\"b\",outcome=\"tls\"} 5\n\
                    nlb_connections_open 7\n";
        assert_eq!(
            metric_sum(text, "nlb_sniff_total", &[("listener", "a")]),
            5.0
        );
        assert_eq!(
            metric_sum(text, "nlb_sniff_total", &[("outcome", "tls")]),
            8.0
        );
        assert_eq!(
            metric_sum(
                text,
                "nlb_sniff_total",
                &[("outcome", "no_match"), ("listener", "a")]
            ),
            2.0
        );
        assert_eq!(metric_sum(text, "nlb_connections_open", &[]), 7.0);
        assert_eq!(metric_sum(text, "nlb_sniff", &[]), 0.0);
    }

    #[test]
    fn sources_are_distinct_loopback_addresses() {
        let all: std::collections::HashSet<Ipv4Addr> = (0..100_000).map(source).collect();
        assert_eq!(all.len(), 100_000);
        assert!(all
            .iter()
            .all(|a| a.is_loopback() && *a != Ipv4Addr::LOCALHOST));
    }
}
